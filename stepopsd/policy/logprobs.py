"""Per-token log-probabilities of a sequence under a causal LM (the trainer's and teacher's view).

Implements log pi(x_t | x_<t) = log_softmax(logits_{t-1} / temperature)[x_t] for every position
of a padded batch; position 0 (no prefix) and padded positions get 0. Position ids are
`cumsum(attention_mask) - 1`, exactly what `model.generate` uses for a left-padded batch, so a
row scores the same whatever its padding side and the result agrees with the log-probs the
generation backend returned for the sampled tokens (the on-policy check).

The temperature is the sampling temperature of the rollout: the backends report
log_softmax(raw_logits / T) for the sampled token, with no top-k / top-p renormalisation, and the
trainer must score with the same T. Greedy decoding (T = 0) reports T = 1 log-probs; score it
with temperature=1.0.

Simplification: the log-softmax is taken one row at a time in float32, so memory beyond the
model's own logits is one [T, V] float32 block, not [B, T, V]. Gradients flow (no no_grad here):
the caller chooses train/eval mode and grad mode.
"""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token among the row's real tokens (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """[B, N, V] logits, [B, N] targets -> [B, N] log_softmax(logits / T) at the targets (float32)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 for log-probs (greedy rollouts: use 1.0)")
    rows = []
    for b in range(logits.shape[0]):
        scaled = logits[b].float() / temperature
        picked = scaled.gather(-1, targets[b].unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, T] log-prob of each token given its prefix; position 0 and padding get 0."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, T]")
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    lp = token_logprobs(out.logits[:, :-1], input_ids[:, 1:], temperature=temperature)
    lp = lp * attention_mask[:, 1:].to(lp.dtype)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
