"""The generation-backend interface the rollout loop talks to (`hf`, `vllm`).

A backend turns prompt token-id lists into sampled continuations with, for every sampled token,
its log-probability log_softmax(raw_logits / temperature)[token] under the policy the backend
holds: PPO's pi_old. Top-k / top-p filtering changes which tokens can be sampled but is NOT
folded into the reported log-probs, so the trainer can recompute them with
`stepopsd.policy.logprobs.sequence_logprobs(..., temperature=T)` and compare (greedy, T = 0,
reports T = 1 log-probs). The continuation includes the stop (eos) token when there was one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The T of the reported log-probs (and of the trainer's recomputation)."""
        return 1.0 if self.greedy else self.temperature


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]  # new tokens, up to and including the stop token
    logprobs: tuple[float, ...]  # one per token: log_softmax(raw_logits / T)[token]
    finish_reason: str  # "stop" (a stop token was sampled) | "length" (max_new_tokens reached)

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r}: choose one of {', '.join(FINISH_REASONS)}")


def stop_token_ids(tokenizer, model) -> list[int]:
    """The ids that end a continuation: the tokenizer's eos plus the model's generation_config eos ids (a hub chat
    model may list several); ValueError when there are none."""
    def ids(value) -> set[int]:
        if value is None:
            return set()
        return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}

    gen_cfg = getattr(model, "generation_config", None)
    stops = sorted(ids(tokenizer.eos_token_id) | ids(getattr(gen_cfg, "eos_token_id", None)))
    if not stops:
        raise ValueError("the tokenizer has no eos token and the model names no eos_token_id: nothing can end a turn")
    return stops


class GenerationBackend(Protocol):
    """What the rollout loop and the datamodule call; backends are registered by name (`registry`)."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Generation]:
        """One continuation per prompt, in prompt order; deterministic for a given seed."""
        ...

    def sync_weights(self, model) -> None:
        """Generate with `model`'s current weights from now on."""
        ...

    def sleep(self) -> None:
        """Free what the backend holds on the accelerator until the next `sync_weights` (after each rollout, for
        the update); a no-op for a backend that holds nothing of its own (HF generates with the trainer's model)."""
        ...

    def close(self) -> None:
        """Release the backend for good (at teardown); a no-op for a backend that holds nothing of its own."""
        ...
