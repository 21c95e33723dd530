"""Generation with `transformers`' `model.generate`: the reference backend (CPU tests, small GPUs).

Implements `GenerationBackend` on a `PreTrainedModel`: prompts (token-id lists of any lengths) are
sorted by length, cut into micro-batches of `batch_size`, left-padded with an attention mask and
decoded with the KV cache, sampling (or greedy when temperature == 0). For every new token the
log-probability log_softmax(raw_logits / T)[token] is computed from generate's raw (unprocessed)
logits, so top-k / top-p filtering and greedy decoding leave the reported log-probs on the
plain temperature-T distribution that `sequence_logprobs(..., temperature=T)` recomputes
(T = 1 for greedy). A continuation ends at and includes the first stop token ("stop") or runs to
max_new_tokens ("length"); the padding generate puts after a finished row is dropped.

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
from transformers import GenerationConfig

from stepopsd.policy.backends.base import Generation, SamplingParams, stop_token_ids


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
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            synced_gpus=False,  # HF turns it on for an FSDP module (an all-reduce per token); see the module docstring
            output_logits=True,
            return_dict_in_generate=True,
            **sampling,
        )
        new = out.sequences[:, width:]
        temp = params.logprob_temperature
        logprobs = torch.stack(
            [torch.log_softmax(step.float() / temp, dim=-1).gather(-1, new[:, t:t + 1]).squeeze(-1)
             for t, step in enumerate(out.logits)],
            dim=1,
        ).cpu()
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
