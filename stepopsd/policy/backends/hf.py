"""Generation with `transformers`' `model.generate`: the reference backend (CPU tests, small GPUs).

Implements `GenerationBackend` on a `PreTrainedModel`: prompts (token-id lists of any lengths) are
sorted by length, cut into micro-batches of `batch_size`, left-padded with an attention mask and
decoded with the KV cache, sampling (or greedy when temperature == 0). For every new token the
log-probability log_softmax(raw_logits / T)[token] is reported, read from the raw (unprocessed)
logits, so top-k / top-p filtering and greedy decoding leave the reported log-probs on the
plain temperature-T distribution that `sequence_logprobs(..., temperature=T)` recomputes
(T = 1 for greedy). A continuation ends at and includes the first stop token ("stop") or runs to
max_new_tokens ("length"); the padding generate puts after a finished row is dropped.

How the log-probs are obtained (memory): generate is NOT asked for `output_logits`/`output_scores`,
which would keep a [steps, rows, vocab] stack per call (64 rows x 151,936 x 4 B x 512 steps = 18.6 GiB
at the paper shapes). Instead a `SampledTokenLogprobs` logits processor is passed to generate; with the
blank generation_config below, transformers' `_get_logits_processor` puts it FIRST, before the
temperature / top-k / top-p warpers, so it sees the raw float32 logits of each step. It keeps only the
current step's log_softmax(logits / T) [rows, vocab]; at the next step it gathers the token generate
appended to input_ids and keeps that [rows] value; the last step's token is gathered from the
returned sequences (generate is asked for no dict, so no per-step outputs or KV cache come back).
The values are the same float32 computation on the same tensors as from `output_logits`, while the
memory is one [rows, vocab] buffer instead of one per step.

Exactness: during generate the model's own `generation_config` is swapped for a blank one, so
sampling defaults shipped with hub checkpoints (Qwen's top_k=20, repetition_penalty=1.05, ...)
cannot alter the distribution behind the backend's back; only `SamplingParams` apply. Stop tokens
are the tokenizer's eos plus the model's generation_config eos ids (a hub chat model may list
several).

Determinism: with `seed`, the RNG is forked and seeded once per call (the caller's RNG state is
untouched), so the same prompts, params, seed and batch_size give the same tokens.
`torch.no_grad()` rather than `inference_mode()`: a module that updates a buffer during forward
(dynamic RoPE rescaling rewrites `inv_freq`) would otherwise keep an inference tensor that breaks
the trainer's backward pass on the same module.
Under trainer=fsdp the caller gathers the full weights around a whole rollout (GRPOModule.full_weights),
so `generate` runs with no communication and ranks may call it different numbers of times: `synced_gpus`
is passed as False, since HF would otherwise switch it on for an FSDP-managed module under torch.distributed
and all-reduce a "finished" flag at every decoding step, which deadlocks ranks with different rollouts.
Simplifications: one continuation per prompt (a GRPO group repeats its prompt); `sync_weights`
only repoints the backend, because generation runs on the very module the trainer updates.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from stepopsd.policy.backends.base import Generation, SamplingParams, stop_token_ids
from stepopsd.policy.backends.registry import register_backend


class SampledTokenLogprobs(LogitsProcessor):
    """Records log_softmax(raw_logits / T)[sampled token] per decoding step, one step's vocabulary at a time.

    Passed to `generate` as its only user logits processor, it runs first on the raw logits (see the
    module docstring) and returns them unchanged. A call at step t (input_ids holding the prompt of
    `prompt_width` columns plus t new tokens) first gathers the token of step t-1, now the last column
    of input_ids, from the log-probs kept at step t-1, then replaces those with step t's. After generate,
    `finish(new_tokens)` gathers the last step's token and returns the [rows, steps] log-probs.
    Steps are indexed by input_ids' length, so a generate that runs extra steps and undoes them
    (transformers' deferred stop check) still reports the kept tokens' values.
    """

    def __init__(self, prompt_width: int, temperature: float):
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.values: list[torch.Tensor] = []  # values[t]: [rows] log-prob of step t's token
        self.step = -1  # the step whose log-probs `current` holds
        self.current: torch.Tensor | None = None  # [rows, vocab] float32 log_softmax(logits / T) of `step`

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        if step != self.step + 1:
            raise RuntimeError(f"SampledTokenLogprobs: step {step} follows step {self.step}")
        if step > 0:
            self.values.append(self.current.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.current = None  # free the previous step's buffer before allocating this one
        self.current = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.step = step
        return scores

    def finish(self, new_tokens: torch.LongTensor) -> torch.Tensor:
        """[rows, n] log-probs of generate's n new tokens (padding after a finished row included)."""
        n = new_tokens.shape[1]
        values = self.values[:n]
        if len(values) < n:  # the last kept step was not followed by another call
            if self.step != n - 1 or len(values) != n - 1:
                raise RuntimeError(f"SampledTokenLogprobs: {n} new tokens but {len(self.values)} gathered at step {self.step}")
            values.append(self.current.gather(-1, new_tokens[:, n - 1:n]).squeeze(-1))
        self.current = None
        return torch.stack(values, dim=1)


@register_backend("hf", options=lambda cfg: {"batch_size": cfg.rollout.generate_batch_size})
class HFBackend:
    """Batched `model.generate` behind the `GenerationBackend` interface."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def sync_weights(self, model) -> None:
        """Generate with `model` from now on (the trainer's module itself: no copy is made)."""
        self.model = model

    def sleep(self) -> None:
        """Nothing to free: generation uses the trainer's own module."""

    def close(self) -> None:
        """Nothing to release: the model belongs to the trainer."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Generation]:
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        with contextlib.ExitStack() as stack:
            if seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=self._cuda_devices()))
                torch.manual_seed(seed)
            stack.enter_context(torch.no_grad())  # not inference_mode: see the module docstring
            stack.enter_context(self._generation_state())
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, gen in zip(idx, self._generate_batch([prompts[i] for i in idx], params)):
                    results[i] = gen
        return results  # type: ignore[return-value]

    # -- internals ------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cuda_devices(self) -> list[int]:
        dev = self._device()
        return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []

    @contextlib.contextmanager
    def _generation_state(self):
        """eval() and a blank generation_config for the call; both restored afterwards."""
        model = self.model
        was_training, saved_cfg = model.training, model.generation_config
        model.eval()
        model.generation_config = GenerationConfig()
        try:
            yield
        finally:
            model.generation_config = saved_cfg
            model.train(was_training)

    def _generate_batch(self, prompts: list[Sequence[int]], params: SamplingParams) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            input_ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            attention_mask[row, width - len(p):] = 1
        sampling = {} if params.greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        device = self._device()
        recorder = SampledTokenLogprobs(width, params.logprob_temperature)
        sequences = self.model.generate(  # a plain tensor: no per-step outputs, and the KV cache is not returned
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            synced_gpus=False,  # HF turns it on for an FSDP module (an all-reduce per token); see the module docstring
            logits_processor=LogitsProcessorList([recorder]),  # the log-probs; see the module docstring
            **sampling,
        )
        new = sequences[:, width:]
        logprobs = recorder.finish(new).cpu()
        new = new.cpu()
        stops = torch.isin(new, torch.tensor(self.stop_ids))
        gens = []
        for row in range(len(prompts)):
            hits = stops[row].nonzero()
            n = int(hits[0]) + 1 if len(hits) else new.shape[1]
            gens.append(Generation(
                token_ids=tuple(new[row, :n].tolist()),
                logprobs=tuple(logprobs[row, :n].tolist()),
                finish_reason="stop" if len(hits) else "length",
            ))
        return gens
