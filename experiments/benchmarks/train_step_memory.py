"""Peak memory and time of one PPO mini-batch (forward, backward, optimizer step) and of the teacher's
rescoring, for the paper's model shapes built with random weights (`model.init=random`: no hub access).

Each configuration runs in its own process through the framework's own code: `random_policy` on the
architecture kept in conf/model/<model>.yaml (shrunk with --shrink), `GRPOModule.accumulate` (micro-batches
with gradient accumulation, every loss term normalised over the mini-batch), AdamW, gradient clipping, a
bf16 KL reference and a bf16 teacher (`TeacherSnapshot`) scored with `tail_logprobs` in teacher micro-
batches, all under bf16 autocast (the paper's `trainer.precision=bf16-mixed`). Rows are random token ids of
--prompt + --response tokens (teacher rows: + --peer hindsight tokens). One warm-up mini-batch, then the
timed one.

Memory: on a GPU `torch.cuda.max_memory_allocated` per phase; on a CPU the process's peak resident set
(monotone: a later phase's figure includes the earlier ones). MFU (GPU only) = 6 * parameters * tokens /
seconds / --peak-tflops (the actor's update; the reference's forward is not counted, as verl reports it).

The fitted estimate (from the rows with gradient checkpointing): static bytes = parameters x (4 fp32 weights + 4 grads + 8 AdamW + 2 bf16 reference +
2 bf16 teacher); activation bytes of one micro-batch = a * rows*(prompt+response)*hidden*layers +
b * rows*response*vocab, with a and b fitted by least squares on this command's measured peaks less the
memory after the models were built and less grads + AdamW states (12 bytes a parameter); the
largest micro_batch_rows whose estimate fits 80 GB and 141 GB (less 10 % for the allocator) is printed for
the paper shapes.

--predict: no measurement; the memory model of the whole colocated step (stepopsd/memory.py: trainer, reference,
teacher, the rollout engine at its utilisation and sleep level) prints its predicted peak GiB per phase for each
model at micro_batch_rows 4/8/16, with the HF rollout or vLLM at 0.5 utilisation and sleep levels 0/1/2, on an
80 GB (H100, 81,559 MiB) and a 141 GB (H200, 143,771 MiB) card, and the check's verdict against that card's free
memory (total less PREDICT_CONTEXT_GIB for the CUDA context). Usage:
    python experiments/benchmarks/train_step_memory.py --predict        # the memory model's table (no run)
    python experiments/benchmarks/train_step_memory.py --device cpu      # shrunken shapes (defaults below)
    python experiments/benchmarks/train_step_memory.py --device cuda --no-shrink --rows 256 --prompt 2048 \
        --response 512 --micro 4 8 16 --peak-tflops 989                  # the paper shapes on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHRINK = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64}
GB = 1024 ** 3
CARDS = {"80 GB": 81_559 / 1024, "141 GB": 143_771 / 1024}  # total GiB: H100 80GB, H200 (nvidia-smi MiB)
PREDICT_CONTEXT_GIB = 0.5  # free = total - this (the CUDA context and the allocator's first blocks)


def arch_of(model: str, shrink: dict) -> dict:
    arch = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{model}.yaml")).arch)
    if arch["model_type"] == "qwen2":
        shrink = {k: v for k, v in shrink.items() if k != "head_dim"}  # Qwen2 derives head_dim
    return arch | shrink


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def synthetic_rows(n: int, prompt: int, response: int, vocab: int, seed: int):
    from stepopsd.data.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    width = prompt + response
    ids = torch.randint(5, vocab, (n, width), generator=g)
    attention = torch.ones(n, width, dtype=torch.long)
    loss_mask = torch.zeros(n, width)
    loss_mask[:, prompt:] = 1
    old = -torch.rand(n, width, generator=g) * loss_mask * 4
    adv = torch.randn(n, 1, generator=g) * loss_mask
    z = torch.zeros(n, dtype=torch.long)
    return RolloutBatch(ids, attention, loss_mask, old, adv, torch.full((n, width), -1), torch.arange(n), z,
                        torch.full((n,), prompt), z, z.float(), z.bool(), z.float(), ())


def one(args) -> dict:
    """One configuration in this process; returns its measurements."""
    from stepopsd.module import GRPOModule, PPOConfig
    from stepopsd.policy.loading import random_policy, task_tokenizer
    from stepopsd.policy.logprobs import tail_logprobs
    from stepopsd.teacher import TeacherSnapshot
    from stepopsd.types import Task

    device = torch.device(args.device)
    arch = json.loads(args.arch)
    if args.head == "plain":  # the baseline: log-probs and entropy on the whole micro-batch, no recomputation
        import stepopsd.module
        from stepopsd.algorithms.grpo import entropy_from_logits
        from stepopsd.policy.logprobs import token_logprobs

        stepopsd.module.logp_and_entropy = lambda z, t, temp: (token_logprobs(z, t, temperature=temp),
                                                               entropy_from_logits(z.float() / temp))
    tok = task_tokenizer([Task("train/heat", "heat", "x", "train", generated=True)])
    policy = random_policy(arch, tok).to(device)
    if args.checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in policy.parameters())
    ppo = PPOConfig(lr=1e-6, kl_coef=0.01, entropy_coef=0.001, mini_batch_rows=args.rows, micro_batch_rows=args.micro,
                    logp_gap_threshold=1e9)
    module = GRPOModule(policy, ppo, frozen_dtype=torch.bfloat16).to(device)
    teacher = TeacherSnapshot(policy, refresh=10, dtype=torch.bfloat16).model.to(device)
    opt = module.configure_optimizers()["optimizer"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    out = {"params": params, "static_gb": peak_bytes(args.device) / GB}

    # teacher rescoring: no grad, teacher micro-batches of --teacher-micro rows, contexts + the hindsight block
    rows = synthetic_rows(args.rows, args.prompt + args.peer, args.response, arch["vocab_size"], seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        for i in range(0, args.rows, args.teacher_micro):
            ids = rows.input_ids[i:i + args.teacher_micro].to(device)
            tail_logprobs(teacher, ids, torch.ones_like(ids), args.response)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out |= {"teacher_s": time.perf_counter() - t0, "teacher_peak_gb": peak_bytes(args.device) / GB}

    # the PPO mini-batch: a warm-up, then the timed one
    batch = synthetic_rows(args.rows, args.prompt, args.response, arch["vocab_size"], seed=2)
    index = torch.arange(args.rows)
    for timed in (False, True):
        if device.type == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            module.accumulate(batch, index)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            seconds = time.perf_counter() - t0
    tokens = args.rows * (args.prompt + args.response)
    out |= {"update_s": seconds, "update_peak_gb": peak_bytes(args.device) / GB, "tokens": tokens}
    if args.peak_tflops:
        out["mfu"] = 6 * params * tokens / seconds / (args.peak_tflops * 1e12)
    return out


def fit(points: list[dict]) -> tuple[float, float]:
    """Least squares of activation bytes (peak - static) on the two per-micro-batch terms (see the docstring)."""
    xs = torch.tensor([[p["a_term"], p["b_term"]] for p in points], dtype=torch.float64)
    ys = torch.tensor([p["act_bytes"] for p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(xs, ys[:, None]).solution[:, 0].clamp(min=0)
    return float(coef[0]), float(coef[1])


def estimate(arch: dict, params: int, a: float, b: float, micro: int, prompt: int, response: int) -> float:
    static = params * (4 + 4 + 8 + 2 + 2)
    act = a * micro * (prompt + response) * arch["hidden_size"] * arch["num_hidden_layers"] + b * micro * response * arch["vocab_size"]
    return (static + act) / GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen3_1.7b", "qwen2.5_3b_instruct"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-shrink", action="store_true", help="the real depth and widths (a GPU)")
    ap.add_argument("--rows", type=int, default=8, help="mini-batch rows (paper: 256)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (paper: 2048; Search-QA 4096)")
    ap.add_argument("--response", type=int, default=32, help="response tokens (paper: 512)")
    ap.add_argument("--peer", type=int, default=64, help="hindsight tokens in teacher rows (paper: up to 512)")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--teacher-micro", type=int, default=4)
    ap.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    ap.add_argument("--head", choices=["checkpointed", "plain", "both"], default="checkpointed",
                    help="log-prob/entropy head: the trainer's (row-wise recomputation) or the plain baseline")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak (H100/H200: 989)")
    ap.add_argument("--predict", action="store_true", help="print the memory model's predicted peaks (no run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.predict:
        predict_table(args.models, [4, 8, 16] if args.micro == ap.get_default("micro") else args.micro)
        return
    if args.one:
        ns = argparse.Namespace(**json.loads(args.one))
        print("RESULT " + json.dumps(one(ns)))
        return

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"# train_step_memory on {card}, commit {commit}, torch {torch.__version__}")
    print(f"# command: python experiments/benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}")
    print(f"# shapes: {args.rows} rows x ({args.prompt} prompt + {args.response} response) tokens; teacher rows + {args.peer} "
          f"hindsight tokens in micro-batches of {args.teacher_micro}; bf16 autocast, fp32 master weights, bf16 reference/teacher")
    print("| model | layers x hidden | params | head | ckpt | micro rows | update s | update peak GB | teacher s | teacher peak GB | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    for model in args.models:
        arch = arch_of(model, {} if args.no_shrink else SHRINK)
        points, params = [], 0
        heads = ["plain", "checkpointed"] if args.head == "both" else [args.head]
        for head, ckpt, micro in [(h, c, m) for h in heads for c in modes for m in args.micro]:
            spec = dict(arch=json.dumps(arch), device=args.device, checkpointing=ckpt, rows=args.rows, prompt=args.prompt,
                        response=args.response, peer=args.peer, micro=micro, teacher_micro=args.teacher_micro,
                        peak_tflops=args.peak_tflops, head=head)
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                print(f"| {model} | {arch['num_hidden_layers']} x {arch['hidden_size']} | | {head} | {'on' if ckpt else 'off'} | {micro} | failed: {err} |||||")
                continue
            r = json.loads(proc.stdout.split("RESULT ")[-1])
            params = r["params"]
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
            print(f"| {model} | {arch['num_hidden_layers']} x {arch['hidden_size']} | {params / 1e6:.1f} M | {head} | {'on' if ckpt else 'off'} "
                  f"| {micro} | {r['update_s']:.2f} | {r['update_peak_gb']:.2f} | {r['teacher_s']:.2f} | {r['teacher_peak_gb']:.2f} | {mfu} |")
            if ckpt and head == args.head.replace("both", "checkpointed"):
                act = (r["update_peak_gb"] - r["static_gb"]) * GB - params * 12  # less grads and AdamW states
                points.append({"a_term": micro * (args.prompt + args.response) * arch["hidden_size"] * arch["num_hidden_layers"],
                               "b_term": micro * args.response * arch["vocab_size"], "act_bytes": act})
        if len(points) >= 2:
            a, b = fit(points)
            full = arch_of(model, {})
            full_params = full_param_count(full)
            print(f"\n# {model}: fitted activation bytes per micro-batch = {a:.3g} * rows*T*hidden*layers + {b:.3g} * rows*response*vocab "
                  f"(with gradient checkpointing, {len(points)} points)")
            for card_gb in (80, 141):
                fits = [m for m in (1, 2, 4, 8, 16, 32, 64)
                        if estimate(full, full_params, a, b, m, 2048, 512) <= 0.9 * card_gb]
                best = max(fits) if fits else 0
                est = estimate(full, full_params, a, b, best or 1, 2048, 512)
                print(f"#   paper shapes (2048 + 512 tokens) on one {card_gb} GB card: micro_batch_rows <= {best} "
                      f"(estimate {est:.1f} GB; static {full_params * 20 / GB:.1f} GB for {full_params / 1e9:.2f} B parameters)")


def predict_table(models: list[str], micros: list[int]) -> None:
    """The memory model's predicted peak per phase at the paper shapes (2048 + 512 tokens, the configs' teacher and
    KL reference, gradient checkpointing), as a markdown table with this machine / commit / command header."""
    from stepopsd import memory

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"# train_step_memory --predict (stepopsd/memory.py, no run) on {platform.node() or 'this machine'}, commit {commit}")
    print(f"# command: python experiments/benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}")
    print(f"# PREDICTED, not measured: a = default_a (analytic), b = {memory.B_LOGITS} (CPU fit), model error "
          f"{memory.MODEL_ERROR:.0%} (assumed); free = card total - {PREDICT_CONTEXT_GIB} GiB; 256-row mini-batches of "
          "2048 + 512 tokens, teacher 8 rows + 512 hindsight tokens, HF rollout 64 prompts a call")
    print("| model | micro rows | rollout engine | card | rollout GiB | teacher GiB | update GiB | peak GiB | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    engines = [("HF generate", "hf", 0)] + [(f"vLLM 0.5, sleep {k}", "vllm", k) for k in (0, 1, 2)]
    for model in models:
        arch = arch_of(model, {})
        params = full_param_count(arch)
        heads = arch["num_attention_heads"]
        kv_dim = arch["num_key_value_heads"] * arch.get("head_dim", arch["hidden_size"] // heads)
        for micro in micros:
            for label, engine, level in engines:
                for card, total in CARDS.items():
                    p = memory.predict(memory.StepMemory(
                        params=params, hidden=arch["hidden_size"], layers=arch["num_hidden_layers"],
                        vocab=arch["vocab_size"], intermediate=arch["intermediate_size"], kv_dim=kv_dim,
                        micro_batch_rows=micro, prompt_tokens=2048, response_tokens=512, engine=engine,
                        gpu_memory_utilization=0.5, sleep_level=level, card_gib=total))
                    status, _ = memory.fit_check(p.peak_gib, total - PREDICT_CONTEXT_GIB)
                    print(f"| {model} | {micro} | {label} | {card} | {p.rollout_gib:.1f} | {p.teacher_gib:.1f} | "
                          f"{p.update_gib:.1f} | {p.peak_gib:.1f} ({p.peak_phase}) | {status} |")


def full_param_count(arch: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


if __name__ == "__main__":
    main()
