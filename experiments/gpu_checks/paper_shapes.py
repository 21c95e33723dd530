"""The GPU check of issue 19 (item 6): the paper shapes on one card within a fixed time, one JSON line per result.

Driver (`python experiments/gpu_checks/paper_shapes.py --out DIR [--budget S] [--dry-run]`, normally started by
paper_shapes.sh): one environment line, then each phase of `PHASES` in its own subprocess under
`timeout -k 10 <limit>`, started only when the time left covers the phase's `need` (otherwise one line
{"phase": ..., "skipped": "time"}); a phase's limit is min(its cap, time left - KILL_GRACE - SLACK), so the driver
ends within --budget seconds whatever the phases do. Every line is appended to DIR/results.jsonl and flushed at
once (a SIGTERM loses nothing written so far); the last line is the summary, also written as DIR/summary.md.

Phases (the framework's own code: `random_policy`, `GRPOModule.accumulate`, `TeacherSnapshot`, `tail_logprobs`,
`VLLMBackend`, `GRPOModule.trainer_logprobs` and `_check_logp_gap`; shapes and knobs read from the composed Hydra
config of `experiment=alfworld_heat model.init=random`, so a renamed knob or argument fails here and in CI):

* qwen3_1.7b: one PPO mini-batch at the paper shapes (algorithm.ppo.mini_batch_rows = 256 rows of
  rollout.max_prompt_tokens 2048 + max_new_tokens 512, micro_batch_rows 8, gradient checkpointing, bf16 autocast,
  fp32 master weights, bf16 KL reference and teacher) after a one-micro-batch warm-up (AdamW's states exist): peak
  allocated / reserved GiB, seconds, MFU (6 x params x tokens / s / PEAK_TFLOPS); the teacher's rescoring of the
  same rows plus the hindsight tokens (algorithm.stepopsd.peer_budget_tokens) in algorithm.teacher.micro_batch_rows;
  both next to stepopsd.memory's prediction for this config (predicted / measured, and the logit coefficient b the
  measurement implies).
* vllm: a Qwen3-1.7B-shaped policy (--vllm-layers decoder layers) with peaked logits (the final norm scaled so the
  softmax has about TARGET_ENTROPY nats: a std-0.02 init gives a near-uniform softmax over 151,936 entries, where any gap is
  meaningless): engine start, weight push (`VLLMBackend.sync_weights`), generate tokens/s for 128 prompts, the
  rollout/trainer log-prob gap after the push (`stepopsd.module.LOGP_GAP_MEAN`, as `_check_logp_gap` logs it) and a
  control that perturbs the trainer's weights without pushing (the gap must jump).
* qwen2.5_3b: the qwen3_1.7b phase for Qwen2.5-3B-Instruct, when time remains.

--dry-run: the same phases on the CPU with a 2-layer, hidden-64 model and a few short rows (about a minute); without
vLLM the vllm phase writes {"skipped": "no vllm"} and runs its log-prob-gap part against an HF stand-in engine (its
own copy of the weights, pushed by copying), so the gap code path is exercised by tests/test_gpu_check.py.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments", "benchmarks")]

RESULTS = "results.jsonl"
PEAK_TFLOPS = 989.0  # H100 / H200 dense bf16
KILL_GRACE = 10  # `timeout -k`: seconds between SIGTERM and SIGKILL
SLACK = 5  # seconds kept back for the driver's own lines
TARGET_ENTROPY = 2.0  # nats: the vllm phase's policy has its final norm scaled to this mean entropy (a std-0.02
# init is near-uniform, ln V = 11.9 nats over 151,936 entries, where any log-prob gap is meaningless)
PERTURB = 0.3  # the control: relative Gaussian noise on every trainer weight matrix, not pushed
DRY_ARCH = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 2048}
DRY_OVERRIDES = ["algorithm.ppo.mini_batch_rows=8", "algorithm.ppo.micro_batch_rows=2", "rollout.max_prompt_tokens=32",
                 "rollout.max_new_tokens=8", "algorithm.teacher.micro_batch_rows=2",
                 "algorithm.stepopsd.peer_budget_tokens=8"]
GiB = 2 ** 30
# pyproject.toml's dependencies the phases import (the repository's Hydra plugins import optuna when a config is
# composed), checked and installed by paper_shapes.sh when missing; not the environments' (alfworld, textworld,
# bm25s, pyarrow), never torch (the image's is kept: its version is recorded)
NEEDED = ("numpy", "transformers", "tokenizers", "lightning", "hydra-core", "omegaconf", "rich", "scipy", "optuna")


@dataclass(frozen=True)
class Phase:
    name: str
    need: int  # seconds: not started with less time left
    cap: int  # seconds: its hard limit when time allows


PHASES = (Phase("qwen3_1.7b", need=100, cap=180), Phase("vllm", need=80, cap=170), Phase("qwen2.5_3b", need=140, cap=220))
MODELS = {"qwen3_1.7b": "qwen3_1.7b", "qwen2.5_3b": "qwen2.5_3b_instruct"}  # phase -> conf/model/<name>.yaml
# fields each kind of line carries (tests/test_gpu_check.py checks them)
FIELDS = {
    "teacher": ("rows", "tokens", "seconds", "peak_allocated_gib", "peak_reserved_gib", "predicted_gib", "memory"),
    "update": ("rows", "micro_batch_rows", "tokens", "seconds", "peak_allocated_gib", "peak_reserved_gib", "mfu",
               "predicted_gib", "predicted_over_measured", "implied_b", "memory"),
    "gap": ("engine", "prompts", "generated_tokens", "generate_s", "tokens_per_s", "mean_token_logp", "gap_mean",
            "gap_max", "control_gap_mean", "control_jumped"),
}


def emit(out: str, record: dict) -> None:
    """One JSON line appended to out/results.jsonl, flushed and synced at once, and echoed."""
    line = json.dumps(record, default=float)
    with open(os.path.join(out, RESULTS), "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(line, flush=True)


# --- the phases (each in its own process) ------------------------------------------------------------------------
def compose(model: str, dry: bool, extra=()):
    from hydra import compose as hydra_compose, initialize_config_dir

    import stepopsd.schemas  # noqa: F401  the typed schemas conf/ composes on

    overrides = ["experiment=alfworld_heat", f"model={model}", "model.init=random", *(DRY_OVERRIDES if dry else []), *extra]
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(ROOT, "conf")):
        return hydra_compose("train", overrides=overrides)


def arch_of(cfg, dry: bool, layers: int | None = None) -> dict:
    from omegaconf import OmegaConf

    arch = OmegaConf.to_container(cfg.model.arch)
    if dry:
        arch |= DRY_ARCH
        if arch["model_type"] == "qwen2":
            arch.pop("head_dim")
    if layers:
        arch["num_hidden_layers"] = layers
    return arch


def build(cfg, arch: dict, device):
    """(policy, tokenizer) as train.py's model.init=random builds them, on `device`."""
    from stepopsd.policy.loading import random_policy, task_tokenizer
    from stepopsd.types import Task

    tok = task_tokenizer([Task("train/heat", "heat", "heat some egg and put it in the fridge", "train", generated=True)])
    policy = random_policy(arch, tok, dtype=cfg.model.dtype, seed=cfg.seed).to(device)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, tok


def ppo_config(cfg, **changes):
    from omegaconf import OmegaConf

    from stepopsd.module import PPOConfig

    knobs = OmegaConf.to_container(cfg.algorithm.ppo, resolve=True)  # rollout_is_cap null: off, no TIS pass measured
    return PPOConfig(**(knobs | changes))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device) -> dict:
    """Peak allocated / reserved GiB since the last reset (CUDA), or the process's peak resident set (CPU)."""
    import torch

    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB, "memory": "cuda max allocated/reserved"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    return {"peak_allocated_gib": rss, "peak_reserved_gib": rss, "memory": "cpu peak resident set"}


def phase_update(name: str, out: str, dry: bool) -> None:
    """One PPO mini-batch and the teacher's rescoring at the configured shapes, next to the memory model."""
    import torch

    from stepopsd import memory
    from stepopsd.module import GRPOModule
    from stepopsd.policy.loading import DTYPES
    from stepopsd.policy.logprobs import tail_logprobs
    from stepopsd.teacher import TeacherSnapshot
    from train_step_memory import synthetic_rows

    device = torch.device("cpu" if dry else "cuda")
    cfg = compose(MODELS[name], dry)
    ppo = ppo_config(cfg)
    r, so = cfg.rollout, cfg.algorithm.stepopsd
    rows, micro, prompt, response = ppo.mini_batch_rows, ppo.micro_batch_rows, r.max_prompt_tokens, r.max_new_tokens
    t0 = time.perf_counter()
    arch = arch_of(cfg, dry)
    policy, _ = build(cfg, arch, device)
    frozen = DTYPES[cfg.model.frozen_dtype]
    module = GRPOModule(policy, ppo, frozen_dtype=frozen).to(device)
    teacher = TeacherSnapshot(policy, refresh=so.teacher_refresh, dtype=frozen).model.to(device)
    opt = module.configure_optimizers()["optimizer"]
    params = sum(p.numel() for p in policy.parameters())
    total = torch.cuda.mem_get_info(device)[1] / GiB if device.type == "cuda" else 0.0
    pred = memory.predict(memory.step_memory(cfg, policy, total))
    vocab = arch["vocab_size"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit(out, {"phase": name, "part": "build", "card": card, "card_total_gib": total, "params": params, "layers": arch["num_hidden_layers"],
               "hidden": arch["hidden_size"], "seconds": time.perf_counter() - t0,
               "predicted_gib": pred.phases, "predicted_parts_gib": pred.parts, "model_error": memory.MODEL_ERROR})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    batch = synthetic_rows(rows, prompt, response, vocab, seed=2)

    # warm-up: one micro-batch and an optimizer step, so AdamW's states exist (the steady state)
    opt.zero_grad(set_to_none=True)
    with autocast:
        module.accumulate(batch, torch.arange(micro))
    opt.step()
    opt.zero_grad(set_to_none=True)

    teacher_rows = cfg.algorithm.teacher.micro_batch_rows
    contexts = synthetic_rows(rows, prompt + so.peer_budget_tokens, response, vocab, seed=1)
    reset_peak(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        for i in range(0, rows, teacher_rows):
            ids = contexts.input_ids[i:i + teacher_rows].to(device)
            tail_logprobs(teacher, ids, torch.ones_like(ids), response, temperature=ppo.temperature)
    sync(device)
    emit(out, {"phase": name, "part": "teacher", "rows": rows, "micro_batch_rows": teacher_rows,
               "tokens": rows * (prompt + so.peer_budget_tokens + response), "seconds": time.perf_counter() - t0,
               **peaks(device), "predicted_gib": pred.teacher_gib})

    reset_peak(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast:
        module.accumulate(batch, torch.arange(rows))
    torch.nn.utils.clip_grad_norm_(policy.parameters(), ppo.max_grad_norm)
    opt.step()
    sync(device)
    seconds = time.perf_counter() - t0
    measured = peaks(device)
    tokens = rows * (prompt + response)
    logit_elements = micro * response * vocab
    without_b = pred.update_gib * GiB - memory.B_LOGITS * logit_elements
    emit(out, {"phase": name, "part": "update", "rows": rows, "micro_batch_rows": micro, "tokens": tokens,
               "seconds": seconds, **measured, "mfu": 6 * params * tokens / seconds / (PEAK_TFLOPS * 1e12),
               "predicted_gib": pred.update_gib,
               "predicted_over_measured": pred.update_gib / max(measured["peak_allocated_gib"], 1e-9),
               "implied_b": (measured["peak_allocated_gib"] * GiB - without_b) / logit_elements})


class CopyEngine:
    """The dry run's stand-in for vLLM: an HF backend on its OWN copy of the weights, so that, as with vLLM, the
    engine sees the trainer's weights only after `sync_weights` (a copy)."""

    def __init__(self, policy, tokenizer):
        from stepopsd.policy.backends.hf import HFBackend

        self.model = copy.deepcopy(policy).eval()
        self.backend = HFBackend(self.model, tokenizer, batch_size=64)

    def sync_weights(self, policy) -> None:
        self.model.load_state_dict(policy.state_dict())

    def generate(self, prompts, params, *, seed=None):
        return self.backend.generate(prompts, params, seed=seed)


def rollout_batch(prompts, generations, width: int):
    """A right-padded `RolloutBatch` of prompt + response rows with the engine's log-probs on the response tokens."""
    import torch

    from stepopsd.data.batch import RolloutBatch

    n = len(prompts)
    ids, attention = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
    loss, logp = torch.zeros(n, width), torch.zeros(n, width)
    for i, (p, g) in enumerate(zip(prompts, generations)):
        row = list(p) + list(g.token_ids)
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        loss[i, len(p):len(row)] = 1
        logp[i, len(p):len(row)] = torch.tensor(g.logprobs)
    z = torch.zeros(n, dtype=torch.long)
    return RolloutBatch(input_ids=ids, attention_mask=attention, loss_mask=loss, rollout_logp=logp,
                        advantages=torch.zeros(n, width), step_ids=torch.full((n, width), -1), row_traj=torch.arange(n),
                        row_step=z, prompt_lens=torch.tensor([len(p) for p in prompts]), traj_group=torch.arange(n),
                        traj_reward=torch.zeros(n), traj_success=torch.zeros(n, dtype=torch.bool),
                        traj_adv=torch.zeros(n), trajectories=())


@__import__("torch").no_grad()
def peak_logits(policy, prompts, device) -> float:
    """Scale the policy's final norm (so its logits) until the mean next-token entropy over `prompts` is
    TARGET_ENTROPY nats (bisection on the scale: the logits are linear in it); returns the scale."""
    import torch

    ids = torch.tensor(prompts, device=device)
    z = policy(input_ids=ids).logits[:, -16:].float()

    def entropy(c: float) -> float:
        logp = torch.log_softmax(c * z, dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    low, high = 1e-2, 1e3  # entropy falls as the scale grows
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if entropy(mid) > TARGET_ENTROPY else (low, mid)
    policy.model.norm.weight.mul_(low)
    return low


def phase_vllm(name: str, out: str, dry: bool, layers: int | None) -> None:
    """Engine start, weight push, generate tokens/s, and the log-prob gap after a push vs without one."""
    import torch
    from omegaconf import OmegaConf

    from stepopsd.module import LOGP_GAP_MAX, LOGP_GAP_MEAN, GRPOModule
    from stepopsd.policy.backends.base import SamplingParams

    has_vllm = importlib.util.find_spec("vllm") is not None
    device = torch.device("cpu" if dry else "cuda")
    cfg = compose("qwen3_1.7b", dry, ["rollout.backend=vllm"])
    arch = arch_of(cfg, dry, layers)
    policy, tok = build(cfg, arch, device)
    prompts_n, prompt_len, new = (128, 16, 8) if dry else (128, 256, 128)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, arch["vocab_size"], (prompts_n, prompt_len), generator=g).tolist()
    scale = peak_logits(policy, prompts[:8], device)
    params = SamplingParams(max_new_tokens=new, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k)
    bf16 = device.type == "cuda"  # the trainer's bf16-mixed on the GPU; the CPU dry run stays float32
    context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)

    if has_vllm:
        from stepopsd.policy.backends.vllm import VLLMBackend, VLLMConfig

        v = OmegaConf.to_container(cfg.rollout.vllm) | {"enforce_eager": True, "max_model_len": prompt_len + new,
                                                         "dtype": "bfloat16" if bf16 else "float32"}
        if dry:
            v["sleep_level"] = 0
        t0 = time.perf_counter()
        engine = VLLMBackend(policy, tok, config=VLLMConfig(**v), seed=cfg.seed)  # builds and pushes once
        emit(out, {"phase": name, "part": "engine", "engine": "vllm", "start_s": time.perf_counter() - t0,
                   "layers": arch["num_hidden_layers"], "gpu_memory_utilization": v["gpu_memory_utilization"],
                   "enforce_eager": True, "dtype": v["dtype"]})
        kind = "vllm"
    else:
        emit(out, {"phase": name, "skipped": "no vllm"})
        if not dry:
            return
        engine, kind = CopyEngine(policy, tok), "hf-standin"
    with context:
        sync(device)
        t0 = time.perf_counter()
        engine.sync_weights(policy)
        sync(device)
        push = time.perf_counter() - t0
        emit(out, {"phase": name, "part": "push", "engine": kind, "push_s": push,
                   "params": sum(p.numel() for p in policy.parameters())})
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params, seed=cfg.seed)
        generate_s = time.perf_counter() - t0
    batch = rollout_batch(prompts, gens, prompt_len + new)
    module = GRPOModule(policy, ppo_config(cfg, kl_coef=0.0, logp_gap_threshold=math.inf, micro_batch_rows=16,
                                           mini_batch_rows=prompts_n)).to(device)

    def gap() -> dict:
        metrics: dict = {}
        with context:
            trainer_logp = module.trainer_logprobs(batch)
        module._check_logp_gap(trainer_logp, batch.rollout_logp, batch.loss_mask, metrics)
        return {"mean": metrics[LOGP_GAP_MEAN][0], "max": metrics[LOGP_GAP_MAX][0]}

    after_push = gap()
    with torch.no_grad():  # the control: the trainer moves, the engine is not told
        for p in policy.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * p.std() * PERTURB)
    control = gap()
    tokens = int(batch.loss_mask.sum())
    emit(out, {"phase": name, "part": "gap", "engine": kind, "prompts": prompts_n, "generated_tokens": tokens,
               "generate_s": generate_s, "tokens_per_s": tokens / generate_s,
               "mean_token_logp": float(batch.rollout_logp.sum() / max(tokens, 1)), "norm_scale": scale,
               "gap_mean": after_push["mean"], "gap_max": after_push["max"], "control_gap_mean": control["mean"],
               "control_jumped": control["mean"] > 10 * after_push["mean"] and control["mean"] > 0.05,
               "gap_metric": LOGP_GAP_MEAN})


# --- what the image lacks -------------------------------------------------------------------------------------
def pinned() -> dict[str, str]:
    """name -> requirement (e.g. "transformers==5.19.0") from pyproject.toml's dependencies and optional ones."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    found = re.findall(r'"([A-Za-z0-9_.-]+)\s*((?:==|>=|<=|~=|<|>)[^";\]]*)?"', text.split("[project.scripts]")[0])
    return {name.lower(): name + (spec or "") for name, spec in found}


def missing_requirements() -> tuple[list[str], str]:
    """(the pinned requirements of NEEDED that are not installed, plus vLLM's when it is missing and the image's
    torch is the one vLLM's pin was built for; a note on vLLM). Reads metadata only: imports nothing."""
    pins, out = pinned(), []
    for name in NEEDED:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(pins[name])
    note = "vllm installed"
    if importlib.util.find_spec("vllm") is None:
        torch_version = importlib.metadata.version("torch").split("+")[0]
        wanted = pins["torch"].split("==")[-1]
        if torch_version == wanted:
            out.append(pins["vllm"])
            note = f"vllm missing: installing {pins['vllm']}"
        else:
            note = f"vllm missing and not installed: {pins['vllm']} needs torch {wanted}, the image has {torch_version}"
    return out, note


# --- the driver ---------------------------------------------------------------------------------------------------
def environment(dry: bool) -> dict:
    """Card, versions and commit. The driver never touches CUDA itself (its context would hold memory during the
    phases): the card comes from nvidia-smi."""
    versions = {}
    for dist in ("torch", "transformers", "tokenizers", "lightning", "hydra-core", "omegaconf", "vllm"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    return {"phase": "environment", "dry_run": dry, "card": smi, "commit": commit or None,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "versions": versions}


def summarise(out: str, started: float) -> dict:
    """The last line: per phase, what it gave (result parts, a skip or an error), and the headline numbers."""
    lines = [json.loads(x) for x in open(os.path.join(out, RESULTS)) if x.strip()]
    phases = {}
    for p in PHASES:
        mine = [x for x in lines if x.get("phase") == p.name]
        phases[p.name] = {"parts": [x["part"] for x in mine if "part" in x],
                          "skipped": [x["skipped"] for x in mine if "skipped" in x],
                          "errors": [x["error"] for x in mine if "error" in x]}
    summary = {"phase": "summary", "wall_s": time.monotonic() - started, "phases": phases}
    rows = ["| phase | part | seconds | peak allocated GiB | predicted GiB | MFU / tokens/s / gap |", "|---|---|---|---|---|---|"]
    for x in lines:
        if x.get("part") in ("teacher", "update"):
            rows.append(f"| {x['phase']} | {x['part']} | {x['seconds']:.2f} | {x['peak_allocated_gib']:.2f} | "
                        f"{x['predicted_gib']:.2f} | {('MFU %.1f%%' % (100 * x['mfu'])) if 'mfu' in x else ''} |")
        elif x.get("part") == "gap":
            rows.append(f"| {x['phase']} ({x['engine']}) | gap | {x['generate_s']:.2f} | | | {x['tokens_per_s']:.0f} tok/s, "
                        f"gap {x['gap_mean']:.2e}, control {x['control_gap_mean']:.2e} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(rows + ["", json.dumps(phases)]) + "\n")
    return summary


def drive(args) -> None:
    started = time.monotonic()
    deadline = started + args.budget
    os.makedirs(args.out, exist_ok=True)
    emit(args.out, environment(args.dry_run))
    for phase in PHASES:
        left = deadline - time.monotonic()
        if left < phase.need + KILL_GRACE + SLACK:
            emit(args.out, {"phase": phase.name, "skipped": "time", "left_s": round(left, 1), "need_s": phase.need})
            continue
        limit = int(min(phase.cap, left - KILL_GRACE - SLACK))
        cmd = ["timeout", "-k", str(KILL_GRACE), str(limit), sys.executable, os.path.abspath(__file__), "--phase", phase.name,
               "--out", args.out] + (["--dry-run"] if args.dry_run else []) + (
               ["--vllm-layers", str(args.vllm_layers)] if args.vllm_layers else [])
        t0 = time.monotonic()
        with open(os.path.join(args.out, f"{phase.name}.log"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = open(os.path.join(args.out, f"{phase.name}.log")).read().strip().splitlines()[-3:]
            emit(args.out, {"phase": phase.name, "error": "timeout" if rc in (124, 137) else f"exit {rc}",
                            "limit_s": limit, "seconds": time.monotonic() - t0, "log_tail": tail})
    emit(args.out, summarise(args.out, started))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all phases together")
    ap.add_argument("--dry-run", action="store_true", help="CPU, shrunken model and shapes (CI)")
    ap.add_argument("--vllm-layers", type=int, default=0, help="decoder layers of the vllm phase's model (0: the config's)")
    ap.add_argument("--missing", action="store_true", help="print the pinned requirements the image lacks, one a line")
    ap.add_argument("--phase", choices=[p.name for p in PHASES], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.missing:
        reqs, note = missing_requirements()
        print(note, file=sys.stderr)
        print("\n".join(reqs))
    elif args.phase == "vllm":
        phase_vllm(args.phase, args.out, args.dry_run, args.vllm_layers or None)
    elif args.phase:
        phase_update(args.phase, args.out, args.dry_run)
    else:
        drive(args)


if __name__ == "__main__":
    main()
