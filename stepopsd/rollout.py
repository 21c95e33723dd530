"""The one multi-turn rollout loop: G rollouts per task with the current policy.

Every live environment goes into each generate call and finished ones leave the batch, so no
tokens are generated for an episode that has ended and nobody waits in lock-step for a slow one
beyond the current turn. Each step keeps what training needs and nothing it must recompute: the
prompt and sampled ids, the sampled tokens' log-probs (PPO's pi_old), the decoded response, the
step target span aligned on the sampled tokens (`spans.token_span`), the env transition, and the observation the
step acted on (a state key for step-level advantage estimators).

The environment supplies the protocol (`prompt`, `target_chars`, `step`); the backend supplies
tokens (`GenerationBackend`). The same loop serves training, validation and `eval.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from stepopsd.algorithms.stepopsd import TARGET_SPAN_MODES
from stepopsd.policy.backends.base import GenerationBackend, SamplingParams
from stepopsd.policy.backends.vllm import VLLMConfig
from stepopsd.spans import decode, token_span
from stepopsd.types import EnvState, StepRecord, Task, Trajectory, Transition



class AgentEnv(Protocol):
    """What the loop needs from an environment (ALFWorld's `AlfWorldEnv` is one)."""

    def reset(self, tasks: Sequence[Task], group_size: int) -> list[EnvState]: ...
    def live_slots(self) -> list[int]: ...
    def prompt(self, slot: int) -> str: ...
    def target_chars(self, response: str, mode: str) -> tuple[int, int] | None: ...
    def step(self, responses: dict[int, str]) -> dict[int, Transition]: ...


@dataclass
class RolloutKnobs:
    """The `rollout` config node (its schema, `stepopsd.schemas`): how rollouts are generated."""

    backend: str = "hf"  # hf (transformers' generate on the trained module) | vllm (an in-process engine per rank)
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    val_temperature: float = 0.4
    max_failed_fraction: float = 0.5  # env crashes/timeouts drop trajectories (counted); more in one batch stops the run
    generate_batch_size: int = 64  # hf: prompts per generate call (vllm batches itself: vllm.max_num_seqs)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # rollout.backend=vllm (stepopsd/policy/backends/vllm.py)


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 8
    max_prompt_tokens: int = 2048
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat_template: bool = True  # wrap each prompt as a user turn with the tokenizer's chat template
    chat_template_kwargs: dict = field(default_factory=dict)  # extra template arguments, e.g. Qwen3's enable_thinking=False
    target_mode: str = "action_only"

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1 (GRPO needs >= 2 to learn anything)")
        if self.max_prompt_tokens < 16:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} is too small: use >= 16")
        if self.target_mode not in TARGET_SPAN_MODES:
            raise ValueError(f"target_mode={self.target_mode!r}: choose one of {', '.join(TARGET_SPAN_MODES)}")


@dataclass
class RolloutStats:
    turns: int = 0  # generate calls
    steps: int = 0  # env steps (= training rows)
    generated_tokens: int = 0
    truncated_prompts: int = 0  # prompts cut from the left to max_prompt_tokens
    failed_trajectories: int = 0
    generate_s: float = 0.0
    env_s: float = 0.0


def encode_prompt(tokenizer, text: str, *, chat_template: bool, max_tokens: int,
                  template_kwargs: dict | None = None) -> tuple[list[int], bool]:
    """Prompt text -> ids (chat-wrapped for instruction models, `template_kwargs` passed to the template),
    left-truncated; returns (ids, truncated)."""
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids[-max_tokens:], True) if len(ids) > max_tokens else (ids, False)


def rollout(env: AgentEnv, backend: GenerationBackend, tokenizer, tasks: Sequence[Task], cfg: RolloutConfig,
            *, seed: int = 0, after_turn: Callable[[int], None] | None = None) -> tuple[list[Trajectory], RolloutStats]:
    """Roll out `cfg.group_size` copies of every task to the end; slot g*G + j is member j of group g.
    `after_turn(turn)` is called after each turn's env step (progress, the tests' fault injection)."""
    stats = RolloutStats()
    t0 = time.perf_counter()
    states = env.reset(tasks, cfg.group_size)
    stats.env_s += time.perf_counter() - t0
    steps: list[list[StepRecord]] = [[] for _ in states]
    current = list(states)  # the env state each slot's next step acts on
    failed = [s.failed for s in states]
    while live := env.live_slots():
        prompts = []
        for slot in live:
            ids, cut = encode_prompt(tokenizer, env.prompt(slot), chat_template=cfg.chat_template, max_tokens=cfg.max_prompt_tokens,
                                     template_kwargs=cfg.chat_template_kwargs)
            prompts.append(ids)
            stats.truncated_prompts += cut
        t0 = time.perf_counter()
        generations = backend.generate(prompts, cfg.sampling, seed=seed * 1_000_003 + stats.turns)
        stats.generate_s += time.perf_counter() - t0
        texts = {slot: decode(tokenizer, g.token_ids) for slot, g in zip(live, generations)}
        t0 = time.perf_counter()
        transitions = env.step(texts)
        stats.env_s += time.perf_counter() - t0
        for slot, ids, gen in zip(live, prompts, generations):
            text, tr = texts[slot], transitions[slot]
            chars = env.target_chars(text, cfg.target_mode)
            target = token_span(tokenizer, gen.token_ids, *chars) if chars else None
            steps[slot].append(StepRecord(tuple(ids), tuple(gen.token_ids), tuple(gen.logprobs), text, target, tr,
                                          observation=current[slot].observation))
            current[slot] = tr.state
            failed[slot] |= tr.state.failed
            stats.generated_tokens += len(gen.token_ids)
        if after_turn is not None:
            after_turn(stats.turns)
        stats.turns += 1
        stats.steps += len(live)
    trajectories = [Trajectory(tasks[slot // cfg.group_size], slot // cfg.group_size, slot % cfg.group_size,
                               tuple(steps[slot]), failed[slot]) for slot in range(len(states))]
    stats.failed_trajectories = sum(failed)
    return trajectories, stats
