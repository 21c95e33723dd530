"""Generation with vLLM: an in-process `vllm.LLM` colocated with the trainer (`rollout.backend=vllm`).

Implements `GenerationBackend` with the HF backend's contract (`base`):
* log-probs: the engine runs with `logprobs_mode="processed_logprobs"` and `logprobs=0`, so each sampled token
  comes with log_softmax(logits / T)[token] (greedy: T = 1, vLLM applies no temperature then), the value the
  trainer recomputes with `sequence_logprobs(..., temperature=T)`. vLLM's processed log-probs are taken after
  top-k / top-p filtering, which the contract leaves out, so this backend refuses top_p < 1 and top_k > 0
  rather than report log-probs the trainer cannot reproduce.
* stop: the tokenizer's and the model's eos ids (`stop_token_ids`, included in the output like HF's);
  finish reasons "stop" / "length".
* seeds: request i of a call with `seed` samples from its own generator seeded (seed, i), so a call is
  deterministic for a seed whatever the engine's batching.
* every prompt of a call goes to one `generate` (all live environments at once); prefix caching is on, so
  multi-turn prompts that share a history reuse its KV cache.

Weights: the engine is built from the policy's config alone (`load_format="dummy"`: no checkpoint on disk,
random weights) and `sync_weights(model)` pushes the trainer's current weights into the engine's model
(the worker's in-place `reload_weights` fed with the trainer's tensors, in process: no copy through a pipe; it
restores the kernel layouts the engine repacked after loading) and resets the prefix cache, whose entries were
computed with the old weights. The rollout loop calls it before every rollout and validation, and the
trainer's log-prob check (`GRPOModule._check_logp_gap`, `rollout/logp_gap_mean`) proves each step that the
push happened: a stale engine stops the run with one line.

GPU memory: `sleep_level` 1 or 2 puts the engine to sleep after each rollout (level 1 frees the KV cache
and offloads the weights to CPU memory, level 2 drops them) and `sync_weights` wakes it in two stages: the
weights first (`wake_up(tags=["weights"])`), then the push, then the KV cache (`wake_up(tags=["kv_cache"])`), so
the KV cache is not resident while the trainer's tensors are streamed in; the allocator's cached blocks are
returned first (`torch.cuda.empty_cache()`, CUDA only) so the engine can take what the update left free. The
weights are pushed again after every wake (vLLM's own `reload_weights` would read the original checkpoint from
disk, vllm#29341). Sleep mode exists on CUDA / ROCm / XPU only. The push streams one tensor at a time from a
generator over `state_dict()` (under FSDP2 each `full_tensor()` is an all-gather: every rank walks the same
names in the same order), cast to the engine's dtype just before it is handed over: vLLM's in-place reload keeps
the tensors of one of its layers until the layer is complete (q/k/v and gate/up are fused there; the state dict
comes layer by layer), so the push holds about one layer, not a copy of the whole model. `enforce_eager` null (the default) means CUDA graphs on GPUs and eager mode on
the CPU build (which has no CUDA graphs; its non-eager mode compiles the model with inductor at start: 25 s
instead of 6 s for the tiny test policy on 2 cores).

Numerics: HF Qwen under bf16 autocast with fp32 master weights keeps the embeddings, the residual stream and
RMSNorm in fp32, a bf16 engine does not, so its log-probs differ from the trainer's systematically (not only when
a push is missed): `algorithm.ppo.rollout_is_cap` left null becomes 2.0 under this backend (`config.check_config`;
truncated importance sampling against the trainer's recomputed pi_old), 0 turns it off explicitly.

Ranks: with torch.distributed initialised over more than one process every rank owns one engine
(`distributed_executor_backend="external_launcher"`, tensor parallel 1) that joins the existing process group.
vLLM 0.32 then reads the launcher's variables: `ExecutorWithExternalLauncher._distributed_args`
(vllm/v1/executor/uniproc_executor.py) takes `int(os.environ["RANK"])` and `int(os.environ["LOCAL_RANK"])`
(the engine's device is cuda:LOCAL_RANK, vllm/v1/worker/gpu_worker.py), and MASTER_ADDR / MASTER_PORT are read
only by the `env://` init that vllm/distributed/parallel_state.py skips when a group already exists. torchrun
sets them all; Lightning's own launcher sets LOCAL_RANK, WORLD_SIZE and MASTER_* but not RANK; a bare `srun`
sets none of them (Lightning sets MASTER_* when it initialises the group). `prepare_engine_env` fills the missing
ones from the initialised process group before the engine is built (`engine_rank_env`: never overwriting a value
that agrees, a one-line error for one that does not). vLLM must run in process:
`VLLM_ENABLE_V1_MULTIPROCESSING=0` is set before it is imported.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Iterator, Mapping, MutableMapping, Sequence

import torch

from stepopsd.errors import UserError
from stepopsd.policy.backends.base import Generation, SamplingParams, stop_token_ids
from stepopsd.policy.backends.registry import register_backend

SKIP_SYNC_VAR = "STEPOPSD_TEST_SKIP_WEIGHT_SYNC"  # tests only: "1" skips every push after the first
INSTALL_HINT = ("rollout.backend=vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, or the CPU build "
                "(README, 'vLLM rollouts')")


@dataclass(frozen=True)
class VLLMConfig:
    gpu_memory_utilization: float = 0.5  # the share of GPU memory the engine may take (weights + KV cache)
    max_model_len: int | None = None  # prompt + response tokens per sequence; None: the run's max_prompt_tokens + max_new_tokens
    dtype: str = "auto"  # the engine's compute dtype; auto: the trainer's (float32 under 32-true, bfloat16 under bf16-mixed)
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: CUDA graphs on GPUs (False), eager on the CPU build (True)
    max_num_seqs: int = 256  # sequences decoded together
    sleep_level: int = 0  # 0 = awake always; 1 = free KV cache, offload weights during the update; 2 = drop both
    kv_cache_gb: float = 1.0  # CPU build only: the KV cache's size (VLLM_CPU_KVCACHE_SPACE)

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}: use a share in (0, 1]")
        if (self.max_model_len is not None and self.max_model_len < 2) or self.max_num_seqs < 1 or self.kv_cache_gb <= 0:
            raise ValueError("rollout.vllm: max_model_len >= 2, max_num_seqs >= 1 and kv_cache_gb > 0")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.vllm.sleep_level={self.sleep_level}: use 0 (off), 1 or 2")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout.vllm.dtype={self.dtype}: use auto, float32, bfloat16 or float16")


def import_vllm():
    """vLLM's `LLM`, `SamplingParams` and `TokensPrompt`, imported in process; ImportError with the install hint."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM, SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return LLM, VLLMSamplingParams, TokensPrompt


def check_unfiltered(top_p: float, top_k: int) -> None:
    """vLLM's processed log-probs are taken after top-k / top-p filtering, the trainer scores the unfiltered
    distribution (`base`): refuse filtered sampling rather than report log-probs the trainer cannot reproduce."""
    if top_p < 1 or top_k > 0:
        raise ValueError(f"rollout.backend=vllm with top_p={top_p}, top_k={top_k}: vLLM reports the log-probs of the "
                         "filtered distribution, the trainer scores the unfiltered one; use top_p=1.0 and top_k=0")


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a call seeded `seed` (a 63-bit mix, distinct per request)."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


# -- the launcher's variables vLLM's external launcher reads ---------------------------------------
class RankEnvError(UserError, RuntimeError):
    """A rank variable in the environment disagrees with the initialised process group."""


def engine_rank_env(rank: int, world_size: int, local_rank: int, environ: Mapping[str, str], *,
                    master_addr: str | None = None, master_port: int | None = None) -> dict[str, str]:
    """The variables to add to `environ` so that a vLLM engine built with the external launcher finds this
    process's place in the process group: RANK, WORLD_SIZE, LOCAL_RANK, and MASTER_ADDR / MASTER_PORT when known.
    A variable already set to the same value is left alone (not returned); one set to another value raises
    `RankEnvError` (one line). MASTER_* are only filled in, never checked: vLLM reads them for an `env://` init
    it skips when the process group exists."""
    if not 0 <= rank < world_size or not 0 <= local_rank < world_size:
        raise ValueError(f"rank {rank}, local rank {local_rank} do not fit a world of {world_size}")
    added = {}
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        have = environ.get(name, "")
        if have.strip() == "":
            added[name] = str(value)
        elif not have.strip().lstrip("-").isdigit() or int(have) != value:
            raise RankEnvError(f"rollout.backend=vllm: {name}={have} in the environment, but this process is "
                               f"{name.lower().replace('_', ' ')} {value} of the initialised process group (world "
                               f"{world_size}); unset {name} or launch with a launcher that sets it right")
    for name, value in (("MASTER_ADDR", master_addr), ("MASTER_PORT", master_port)):
        if value is not None and not environ.get(name):
            added[name] = str(value)
    return added


def local_rank_from_hosts(rank: int, hosts: Sequence[str]) -> int:
    """The local rank of `rank` given every rank's host name: how many lower ranks share its host."""
    return sum(h == hosts[rank] for h in hosts[:rank])


def _group_address() -> tuple[str | None, int | None]:
    """The host and port of the default process group's TCP store (None, None for another kind of store)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store  # no public accessor in torch 2.13

        store = _get_default_store()
        while isinstance(store, torch.distributed.PrefixStore):
            store = store.underlying_store
        if isinstance(store, torch.distributed.TCPStore):
            return store.host, store.port
    except (ImportError, RuntimeError, AttributeError):
        pass
    return None, None


def prepare_engine_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Before a vLLM engine joins the initialised process group (external launcher): set the rank variables it
    reads (`engine_rank_env`) from the group itself, whatever started the processes; returns what was added
    ({} for a single process). The local rank comes from LOCAL_RANK (torchrun, Lightning's launcher), else
    SLURM_LOCALID when srun started one task per rank, else from the ranks' host names (a collective: every rank
    builds its engine at the same point)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return {}
    rank, world = dist.get_rank(), dist.get_world_size()
    if environ.get("LOCAL_RANK", "").strip():
        local = int(environ["LOCAL_RANK"])
    elif environ.get("SLURM_LOCALID", "").strip() and environ.get("SLURM_NTASKS") == str(world):
        local = int(environ["SLURM_LOCALID"])
    else:
        hosts: list = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        local = local_rank_from_hosts(rank, hosts)
    addr, port = _group_address()
    added = engine_rank_env(rank, world, local, environ, master_addr=addr, master_port=port)
    environ.update(added)
    return added


def engine_tensors(model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s state dict one tensor at a time, each full (an FSDP2 DTensor gathered: a collective, every rank
    walks the same names in the same order) and cast to the engine's dtype only when it is handed over."""
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, full.detach().to(dtype)
        del full


@register_backend("vllm")  # its keyword arguments (config, seed) are read by train.vllm_config; vLLM imports on build
class VLLMBackend:
    """An in-process vLLM engine behind the `GenerationBackend` interface; `sync_weights` after every update."""

    def __init__(self, model, tokenizer, *, config: VLLMConfig | None = None, seed: int = 0):
        self.config = cfg = config or VLLMConfig()
        if cfg.dtype == "auto" or cfg.max_model_len is None:
            raise ValueError("VLLMConfig: dtype=auto and max_model_len=None are resolved by the run "
                             "(stepopsd.config.vllm_config); give both when building a VLLMBackend directly")
        LLM, self._params_cls, self._prompt_cls = import_vllm()
        from vllm.platforms import current_platform

        if cfg.sleep_level and not current_platform.is_sleep_mode_available():
            raise ValueError(f"rollout.vllm.sleep_level={cfg.sleep_level}: vLLM's sleep mode needs a CUDA, ROCm or "
                             "XPU device; use sleep_level=0 here")
        self.stop_ids = stop_token_ids(tokenizer, model)
        extra = {}
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gb))))
            # one scheduler step takes every prompt whole: the CPU build crashes when a seeded request's prefill is
            # split over steps (it rewinds the request's generator, which CPU generators cannot do)
            extra["max_num_batched_tokens"] = cfg.max_num_seqs * cfg.max_model_len
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if distributed:  # the external launcher reads RANK / LOCAL_RANK: fill them in whatever the launcher
            prepare_engine_env()
        eager = current_platform.is_cpu() if cfg.enforce_eager is None else cfg.enforce_eager
        self.dtype = getattr(torch, cfg.dtype)
        self._config_dir = tempfile.TemporaryDirectory(prefix="stepopsd-vllm-")
        arch = model.config.to_dict()  # the architecture only: weights come from sync_weights
        arch["architectures"] = arch.get("architectures") or [type(model).__name__]
        with open(os.path.join(self._config_dir.name, "config.json"), "w") as f:
            json.dump(arch, f)
        self.llm = LLM(
            model=self._config_dir.name, runner="generate", load_format="dummy", skip_tokenizer_init=True, dtype=cfg.dtype,
            seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching, enforce_eager=eager,
            max_num_seqs=cfg.max_num_seqs, logprobs_mode="processed_logprobs", enable_sleep_mode=bool(cfg.sleep_level),
            generation_config="vllm",  # no sampling defaults from a config file: only SamplingParams apply
            **extra, **({"distributed_executor_backend": "external_launcher"} if distributed else {}),
        )
        self.asleep = False
        self.pushes = 0  # weight pushes so far (a diagnostic)
        self.sync_weights(model)

    # -- weights --------------------------------------------------------------------------------
    def sync_weights(self, model) -> None:
        """Push `model`'s current weights into the engine and reset the prefix cache. A sleeping engine wakes in
        two stages around the push: its weights, the push, then its KV cache. `model` holds full weights or
        FSDP2 DTensors (gathered one at a time, a collective: every rank calls this together)."""
        if self.asleep:
            self._wake_up(["weights"])
        if not (self.pushes and os.environ.get(SKIP_SYNC_VAR) == "1"):  # tests only: keep the stale weights
            # the worker's in-place reload from an iterator of checkpoint-format tensors, consumed one at a
            # time: it undoes the kernel repacking done after the first load (the CPU build's linear layers),
            # loads, and repacks
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": engine_tensors(model, self.dtype), "is_checkpoint_format": True})
            self.pushes += 1
        if self.asleep:
            self._wake_up(["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update (sleep_level 1 or 2); a no-op when sleep is off."""
        if self.config.sleep_level and not self.asleep:
            self.llm.sleep(level=self.config.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        """Wake the whole engine (weights and KV cache at once); `sync_weights` wakes it in stages instead."""
        if self.asleep:
            self._wake_up(None)
            self.asleep = False

    def _wake_up(self, tags: list[str] | None) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # blocks the update freed go back to the driver, where the engine allocates
        self.llm.wake_up(tags=tags)

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Generation]:
        check_unfiltered(params.top_p, params.top_k)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if len(p) + params.max_new_tokens > self.config.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens + max_new_tokens {params.max_new_tokens} > "
                                 f"rollout.vllm.max_model_len={self.config.max_model_len}: raise it")
        self.wake()
        sampling = [self._params_cls(
            n=1, temperature=params.temperature, top_p=1.0, top_k=0, max_tokens=params.max_new_tokens, logprobs=0,
            seed=None if seed is None else request_seed(seed, i), stop_token_ids=self.stop_ids, detokenize=False,
        ) for i in range(len(prompts))]
        outputs = self.llm.generate([self._prompt_cls(prompt_token_ids=list(p)) for p in prompts], sampling,
                                    use_tqdm=False)
        return [self._generation(out.outputs[0]) for out in outputs]

    def _generation(self, completion) -> Generation:
        ids = tuple(int(t) for t in completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(ids):
            raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
        logprobs = tuple(float(step[t].logprob) for step, t in zip(completion.logprobs, ids))
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with {reason!r} (expected stop or length)")
        return Generation(token_ids=ids, logprobs=logprobs, finish_reason=reason)

    def close(self) -> None:
        self.llm = None
        self._config_dir.cleanup()
