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


def left_align(tensors: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn RIGHT-padded rows into left-padded ones: each row's real tokens move to the last columns
    (all tensors of the dict alike, [B, W] each), so that the responses of every row end together."""
    width = attention_mask.shape[1]
    shift = width - attention_mask.long().sum(1, keepdim=True)  # [B, 1]
    index = (torch.arange(width, device=attention_mask.device)[None, :] - shift) % width  # [B, W]
    return {name: t.gather(1, index) for name, t in tensors.items()}


def right_align(tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `left_align` for one [B, W] tensor: `attention_mask` is the RIGHT-padded rows' mask."""
    width = attention_mask.shape[1]
    shift = width - attention_mask.long().sum(1, keepdim=True)
    index = (torch.arange(width, device=attention_mask.device)[None, :] + shift) % width
    return tensor.gather(1, index)


def tail_width(loss_mask: torch.Tensor) -> int:
    """Columns from the first loss token of any row to the end of a left-aligned [B, W] batch (>= 1)."""
    width = loss_mask.shape[1]
    cols = torch.arange(width, device=loss_mask.device).expand_as(loss_mask)
    first = torch.where(loss_mask > 0, cols, width).min()
    return max(1, width - int(first))


def tail_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits [B, keep, V] that predict the last `keep` tokens of a LEFT-padded batch. The LM head runs on
    those positions only (`logits_to_keep`): for a policy whose vocabulary is large next to its hidden
    size, most of the cost of scoring a long prompt."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, logits_to_keep=keep + 1)
    return out.logits[:, :-1]  # position t predicts token t + 1


def tail_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int, *,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probs [B, keep] of the last `keep` tokens of a LEFT-padded batch and the logits [B, keep, V]
    that gave them (`tail_logits`)."""
    logits = tail_logits(model, input_ids, attention_mask, keep)
    return token_logprobs(logits, input_ids[:, -keep:], temperature=temperature), logits
