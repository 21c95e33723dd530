"""A memory model of one colocated training step on one GPU, and the fits/does-not-fit check `train.py` runs on CUDA.

One training step has three phases, each with its own peak (GiB = 2**30 bytes):

* **rollout**: the trainer's persistent state (below) plus the generation engine: vLLM's reservation,
  `gpu_memory_utilization` x the card's total memory (weights + KV cache; vLLM takes that share whatever the trainer
  holds), or the HF backend's KV cache, prefill activations and autocast weight cache;
* **teacher rescoring** (StepOPSD with a teacher snapshot): persistent state, the engine while idle, and one no-grad
  teacher pass of `algorithm.teacher.micro_batch_rows` hindsight contexts;
* **update**: persistent state, the gradients, the engine while idle, the autocast weight cache and the activations
  of one micro-batch.

Persistent state (bytes a parameter): fp32 master weights 4 and AdamW 8 (both / the FSDP world size), the bf16 KL
reference 2 and the bf16 teacher snapshot 2 (whole replicas, when present). fp32 gradients 4 (/ world) during the
update; outside it only with `grads_kept` (gradients not freed after the update's last optimizer step). bf16-mixed
autocast keeps a bf16 copy of each fp32 weight it casts (2 bytes a parameter) for the whole autocast region (an
update, an HF rollout); under FSDP the gathered weights are already bf16 (no cache; the rollout gathers the full
policy, 2 bytes a parameter). vLLM asleep (`sleep_level` 1: weights offloaded to host memory and KV cache freed;
2: both freed) leaves `VLLM_ASLEEP_GIB` on the card; at level 0 it keeps its whole reservation in every phase.

Activations of one update micro-batch of m rows x T = prompt + response tokens (R response tokens, hidden h,
L layers, vocabulary V):  a * m*T*h*L + b * m*R*V  bytes, the form `experiments/benchmarks/train_step_memory.py` fits.
Where the defaults come from (no GPU measurement exists yet: this is an estimate, to be replaced by the numbers of
`experiments/gpu_checks/paper_shapes.sh`, which reports the prediction next to the measured peak):

* b = `B_LOGITS` = 37.9, the mean of the two CPU fits in experiments/benchmarks/README.md ("PPO update and teacher
  memory at the paper's model shapes": 39.1 for Qwen3-1.7B, 36.7 for Qwen2.5-3B, commit 1656690). Those are CPU
  resident-set peaks (allocator caches included), so probably high for a GPU's allocated bytes.
* a: the CPU fit (0.62-0.66) is below what checkpointing must keep (the README says 2-layer runs cannot determine it),
  so a is analytic: with gradient checkpointing, the fp32 residual stream at each decoder layer's input
  (`CKPT_BOUNDARY_BYTES` = 4) plus one layer recomputed in backward; without it, every layer's saved tensors,
  `layer_bytes` = 24 h + 8 I per token (norm inputs and the residual in fp32, attention and MLP inputs in bf16; I the
  MLP width: gate, up, activation and down inputs in bf16). No-grad passes (HF prefill, teacher) hold one layer at a
  time, `forward_bytes` = 8 h + 6 I per token.

`MODEL_ERROR` (0.25) is an assumed error, not a measured one (see its comment). `fit_check` stops a run whose
prediction exceeds the free memory by more than that error and warns when it is within it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from stepopsd.errors import UserError

GIB = 2 ** 30

# bytes a parameter
MASTER_BYTES = 4  # fp32 trainable weights (the optimizer's master copy)
GRAD_BYTES = 4  # fp32 gradients
ADAMW_BYTES = 8  # AdamW's two fp32 moments
FROZEN_BYTES = 2  # bf16 KL reference, bf16 teacher snapshot (model.frozen_dtype)
AUTOCAST_CACHE_BYTES = 2  # bf16 copies of fp32 weights kept by autocast for its region
GATHERED_BYTES = 2  # FSDP: the full policy gathered in param_dtype (bf16) for rollouts

CKPT_BOUNDARY_BYTES = 4.0  # per row x token x hidden x layer with checkpointing: the fp32 residual at each layer input
B_LOGITS = 37.9  # per row x response token x vocabulary entry: mean of the CPU fits 39.1 / 36.7 (benchmarks README)
TEACHER_LOGIT_BYTES = 2  # the teacher's bf16 logits over its response window (no grad)
ROW_FP32_COPIES = 3  # one row's float32 copies while its log-softmax is taken (scaled logits, exp, result)
KV_BYTES = 2  # the HF rollout's KV cache in bf16 (autocast)
VLLM_ASLEEP_GIB = 1.0  # left on the card by a sleeping engine (buffers, allocator); an assumption, not measured
# The model's error: assumed, no GPU measurement yet. The two models' CPU fits of b differ by 6 %, and CPU resident
# set vs GPU allocated bytes may differ by more; replace it by |predicted - measured| / measured from the GPU check.
MODEL_ERROR = 0.25

KNOBS = ("algorithm.ppo.micro_batch_rows", "model.gradient_checkpointing", "rollout.vllm.gpu_memory_utilization",
         "rollout.vllm.sleep_level")
CHECK_VAR = "STEPOPSD_MEMORY_CHECK"  # "warn": a predicted overflow only warns; "off": no check


def layer_bytes(hidden: int, intermediate: int) -> float:
    """Bytes a decoder layer saves for backward per token without checkpointing (bf16 autocast, fp32 residual)."""
    return 24.0 * hidden + 8.0 * intermediate


def forward_bytes(hidden: int, intermediate: int) -> float:
    """Bytes one no-grad decoder layer holds per token while it runs (prefill, teacher): the fp32 residual and its
    bf16 norm, attention projections (8 h in all) and the MLP's gate, up and activation outputs in bf16 (6 I)."""
    return 8.0 * hidden + 6.0 * intermediate


def default_a(checkpointing: bool, hidden: int, intermediate: int, layers: int) -> float:
    """Activation bytes per row x token x hidden x layer (the fit's a), see the module docstring."""
    per_hidden = layer_bytes(hidden, intermediate) / hidden
    return CKPT_BOUNDARY_BYTES + per_hidden / layers if checkpointing else per_hidden


@dataclass(frozen=True)
class StepMemory:
    """The inputs of the model: the policy's shape, the step's shapes and the engine's settings."""
    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    kv_dim: int  # num_key_value_heads x head_dim
    micro_batch_rows: int
    prompt_tokens: int
    response_tokens: int
    gradient_checkpointing: bool = True
    world: int = 1  # FSDP shards (1: one process, or DDP, which replicates)
    reference: bool = True  # the bf16 KL reference (kl_coef > 0)
    teacher: bool = True  # a bf16 teacher snapshot (StepOPSD with teacher_refresh > 0)
    teacher_rows: int = 8
    teacher_extra_tokens: int = 512  # hindsight block tokens in a teacher row
    engine: str = "hf"  # hf | vllm
    generate_rows: int = 64  # hf: prompts per generate call
    gpu_memory_utilization: float = 0.5  # vllm
    sleep_level: int = 0  # vllm
    card_gib: float = 80.0  # the card's total memory (vLLM's reservation is a share of it)
    grads_kept: bool = False  # gradients alive outside the update
    a: float | None = None  # None: default_a(...)
    b: float = B_LOGITS


@dataclass(frozen=True)
class Prediction:
    rollout_gib: float
    teacher_gib: float  # 0 without a teacher pass
    update_gib: float
    parts: dict = field(default_factory=dict)  # named terms in GiB, for the logs

    @property
    def phases(self) -> dict[str, float]:
        return {"rollout": self.rollout_gib, "teacher": self.teacher_gib, "update": self.update_gib}

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_gib(self) -> float:
        return max(self.phases.values())


def predict(s: StepMemory) -> Prediction:
    """Predicted peak GiB of each phase of one training step (see the module docstring for every term)."""
    if s.engine not in ("hf", "vllm"):
        raise ValueError(f"engine={s.engine!r}: hf or vllm")
    p, w = s.params, max(1, s.world)
    tokens = s.prompt_tokens + s.response_tokens
    master, adamw, grads = p * MASTER_BYTES / w, p * ADAMW_BYTES / w, p * GRAD_BYTES / w
    frozen = p * FROZEN_BYTES * (int(s.reference) + int(s.teacher))
    persistent = master + adamw + frozen + (grads if s.grads_kept else 0)
    gathered = p * GATHERED_BYTES if w > 1 else 0  # FSDP: the full policy for the rollout
    cache = p * AUTOCAST_CACHE_BYTES if w == 1 else 2 * p / s.layers * GATHERED_BYTES  # FSDP: two gathered layers
    no_grad_layer = forward_bytes(s.hidden, s.intermediate)

    if s.engine == "vllm":
        engine = s.gpu_memory_utilization * s.card_gib * GIB
        idle = engine if s.sleep_level == 0 else VLLM_ASLEEP_GIB * GIB
        generation = engine + gathered
    else:
        kv = s.generate_rows * tokens * s.layers * 2 * s.kv_dim * KV_BYTES
        prefill = s.generate_rows * s.prompt_tokens * no_grad_layer
        generation = kv + prefill + (gathered if w > 1 else cache)
        idle = 0.0

    teacher = 0.0
    if s.teacher:
        rows, width = s.teacher_rows, tokens + s.teacher_extra_tokens
        transient = (rows * width * no_grad_layer + rows * s.response_tokens * s.vocab * TEACHER_LOGIT_BYTES
                     + ROW_FP32_COPIES * 4 * s.response_tokens * s.vocab)
        teacher = persistent + idle + transient

    a = default_a(s.gradient_checkpointing, s.hidden, s.intermediate, s.layers) if s.a is None else s.a
    m = s.micro_batch_rows
    activations = a * m * tokens * s.hidden * s.layers + s.b * m * s.response_tokens * s.vocab
    update = persistent + (0 if s.grads_kept else grads) + idle + cache + activations
    parts = {"weights": master, "adamw": adamw, "grads": grads, "frozen": frozen, "autocast_cache": cache,
             "generation": generation, "engine_idle": idle, "activations": activations}
    return Prediction((persistent + generation) / GIB, teacher / GIB, update / GIB,
                      {k: v / GIB for k, v in parts.items()})


def fit_check(predicted_gib: float, free_gib: float, margin: float = MODEL_ERROR) -> tuple[str, str]:
    """("ok" | "warn" | "stop", one line). stop: the prediction is past the free memory by more than the model's
    error (predicted x (1 - margin) > free); warn: within it (predicted x (1 + margin) > free); ok otherwise."""
    knobs = (f"lower {KNOBS[0]}, set {KNOBS[1]}=true, lower {KNOBS[2]} or set {KNOBS[3]}=1 or 2 "
             f"(vLLM sleeps during the update)")
    head = f"predicted peak GPU memory {predicted_gib:.1f} GiB, {free_gib:.1f} GiB free (model error {margin:.0%})"
    if predicted_gib * (1 - margin) > free_gib:
        return "stop", (f"{head}: this step does not fit the card: {knobs}; stepopsd/memory.py explains the estimate, "
                        f"{CHECK_VAR}=warn only warns")
    if predicted_gib * (1 + margin) > free_gib:
        return "warn", f"{head}: close to the card's limit; if it runs out of memory: {knobs}"
    return "ok", f"{head}: fits"


# --- from the run's config -----------------------------------------------------------------------------------------
def step_memory(cfg, policy, card_gib: float) -> StepMemory:
    """The model's inputs for a run: the Hydra config `cfg` and the built `policy` (its parameter count and
    config), on a card of `card_gib` total GiB."""
    config = policy.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ppo, r = cfg.algorithm.ppo, cfg.rollout
    tokens = r.max_prompt_tokens + r.max_new_tokens
    micro = ppo.micro_batch_rows or ppo.mini_batch_rows
    if ppo.get("micro_batch_tokens"):
        micro = min(micro, max(1, ppo.micro_batch_tokens // tokens))
    from stepopsd.launch import sharded

    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes) if sharded(cfg.trainer) else 1
    stepopsd = cfg.algorithm.get("stepopsd")
    teacher = cfg.algorithm.name == "stepopsd" and stepopsd is not None and stepopsd.teacher_refresh > 0
    vllm = r.backend == "vllm"
    return StepMemory(
        params=sum(p.numel() for p in policy.parameters()), hidden=hidden, layers=layers, vocab=config.vocab_size,
        intermediate=getattr(config, "intermediate_size", 4 * hidden), kv_dim=kv_heads * head_dim,
        micro_batch_rows=micro, prompt_tokens=r.max_prompt_tokens, response_tokens=r.max_new_tokens,
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing")), world=world,
        reference=ppo.kl_coef > 0, teacher=teacher,
        teacher_rows=cfg.algorithm.teacher.micro_batch_rows if teacher else 0,
        teacher_extra_tokens=stepopsd.peer_budget_tokens if teacher else 0,
        engine="vllm" if vllm else "hf", generate_rows=r.generate_batch_size,
        gpu_memory_utilization=r.vllm.gpu_memory_utilization if vllm else 0.0,
        sleep_level=r.vllm.sleep_level if vllm else 0, card_gib=card_gib)


def memory_decision(cfg, policy, free_gib: float, total_gib: float, margin: float = MODEL_ERROR):
    """(status, one line, Prediction) for a run on a card with `free_gib` of `total_gib` GiB free."""
    pred = predict(step_memory(cfg, policy, total_gib))
    status, line = fit_check(pred.peak_gib, free_gib, margin)
    phases = ", ".join(f"{k} {v:.1f}" for k, v in pred.phases.items() if v)
    return status, f"{line} [{phases} GiB; peak in {pred.peak_phase}]", pred


class MemoryFitError(UserError, RuntimeError):
    """The predicted step does not fit the card: one line naming the knobs to change."""


def check_memory(cfg, policy, trainer) -> str | None:
    """Before the first rollout, on CUDA only (a CUDA accelerator and a visible GPU): compare the prediction with the
    card's free memory (`torch.cuda.mem_get_info`); "stop" raises `MemoryFitError` (one line), "warn" prints a warning.
    `STEPOPSD_MEMORY_CHECK=warn` turns a stop into a warning, `=off` skips the check. Returns the status (None: no
    check on this machine). It runs before `trainer.fit`, when no process group exists yet: each rank checks its own
    card (the ranks of one job normally hold identical cards and configs, so they decide alike); a rank that stops
    ends the job through its launcher (torchrun and Lightning's launcher stop the other ranks when one fails)."""
    import torch

    mode = os.environ.get(CHECK_VAR, "on").lower()
    if mode == "off" or not torch.cuda.is_available():
        return None
    from lightning.pytorch.accelerators import CUDAAccelerator

    if not isinstance(getattr(trainer, "accelerator", None), CUDAAccelerator):
        return None
    device = trainer.strategy.root_device
    free, total = torch.cuda.mem_get_info(device)
    status, line, _ = memory_decision(cfg, policy, free / GIB, total / GIB)
    if status == "stop" and mode != "warn":
        raise MemoryFitError(f"{torch.cuda.get_device_name(device)}: {line}")
    if status != "ok":
        print(f"[memory] warning: {line}", flush=True)
    else:
        print(f"[memory] {line}", flush=True)
    return status
