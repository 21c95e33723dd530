"""From trajectories to the typed training batch: the reward manager.

`build_batch` turns the rollout's trajectories into a `RolloutBatch` in the step-per-row layout
(ALFWorld: every env step is its own prompt, so every step is one row of prompt + response tokens):

    outcome reward R_i = sum of the step rewards (10 * won - 0.1 * invalid steps), success = won
    step_ids = k on the tokens of step k's target span Z_k, -1 elsewhere (for Eq. 4-12)

The advantages are not computed here: the batch leaves with zeros, and the training step's one advantage stage
fills them with the configured estimator (`stepopsd.estimators`, `callbacks.advantages.AdvantageStage`).

Trajectories whose engine failed (crashed, hung, lost its retriever) are left out and counted; their
group is normalised over its survivors, and a group left with fewer than two is dropped and counted: one
member's A_i is 0 by Eq. 1 (R_i minus its own mean), so it would add only the KL and entropy terms of a
subset chosen by the faults. Rows are right-padded; `loss_mask` covers response tokens only (prompt and observation
tokens are never in the loss).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, fields, replace

import torch

from stepopsd.algorithms.distill import DistillTerm
from stepopsd.algorithms.grpo import uniform_group_fraction
from stepopsd.types import Trajectory


@dataclass
class RolloutBatch:
    """Step rows [N, L] plus per-trajectory values [M]; rows of trajectory m have row_traj == m.

    Only `advantages`, `traj_adv` and the loss term (`teacher_logp`, `distill`) are ever reassigned after
    construction: the advantage stage writes the configured estimator's values there (zeros / None until then)
    before `training_step` reads them."""

    input_ids: torch.Tensor  # [N, L] long, prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, L] long
    loss_mask: torch.Tensor  # [N, L] float, 1 on response tokens
    rollout_logp: torch.Tensor  # [N, L] float, log pi_old of response tokens (0 elsewhere)
    advantages: torch.Tensor  # [N, L] float, the estimator's advantage of every response token (0 elsewhere)
    step_ids: torch.Tensor  # [N, L] long, step index k on target tokens, -1 elsewhere
    row_traj: torch.Tensor  # [N] long, trajectory index of each row
    row_step: torch.Tensor  # [N] long, step index k of each row within its trajectory
    prompt_lens: torch.Tensor  # [N] long
    traj_group: torch.Tensor  # [M] long
    traj_reward: torch.Tensor  # [M] float, outcome reward R_i
    traj_success: torch.Tensor  # [M] bool
    traj_adv: torch.Tensor  # [M] float, an outcome-level estimator's A_i (Eq. 1 for GRPO); 0 otherwise
    trajectories: tuple[Trajectory, ...]  # the records the hindsight contexts are built from (Eq. 3)
    trainer_logp: torch.Tensor | None = None  # [N, L] pi_old recomputed by the trainer (ppo.rollout_is_cap only)
    # an estimator's loss term (SDAR's self-distillation baselines, `stepopsd.algorithms.distill`): the teacher's
    # log-probs of the target tokens [N, L] (0 elsewhere) and the term's coefficients; None for the others
    teacher_logp: torch.Tensor | None = None
    distill: "DistillTerm | None" = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "RolloutBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The row tensors of a mini-batch, trimmed to its longest row."""
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max()) if len(index) else 0
        names = ("input_ids", "attention_mask", "loss_mask", "rollout_logp", "advantages", "step_ids")
        names += ("trainer_logp",) if self.trainer_logp is not None else ()
        names += ("teacher_logp",) if self.teacher_logp is not None else ()
        return {name: getattr(self, name)[index][:, :width] for name in names}


def micro_batches(index: torch.Tensor, lengths: torch.Tensor, *, rows: int, tokens: int = 0) -> list[torch.Tensor]:
    """Split one mini-batch (row indices `index` [n], their lengths [n]) into micro-batches for
    gradient accumulation: at most `rows` rows each and, with a token budget `tokens` > 0, at most
    that many padded tokens (rows x longest row) each (a longer row goes alone), as verl's dynamic
    batch size. Rows are taken longest first, so rows of similar length share a micro-batch and
    padding stays small; the split never changes the loss (it is normalised over the mini-batch)."""
    if rows < 1 or tokens < 0:
        raise ValueError(f"micro-batches need rows >= 1 and tokens >= 0, got {rows} and {tokens}")
    if len(index) <= rows and (not tokens or len(index) * int(lengths.max()) <= tokens):
        return [index]  # one pass, rows in their given order
    order = torch.argsort(lengths, descending=True, stable=True)
    out, current, longest = [], [], 0
    for i in order.tolist():
        n = int(lengths[i])
        if current and (len(current) == rows or (tokens and (len(current) + 1) * max(longest, n) > tokens)):
            out.append(index[current])
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        out.append(index[current])
    return out


def build_batch(trajectories: list[Trajectory], *, pad_id: int) -> tuple[RolloutBatch, dict]:
    """The training batch and the reward manager's metrics (reward, success, uniform-group share)."""
    kept = [t for t in trajectories if not t.failed and t.steps]
    survivors = collections.Counter(t.group for t in kept)
    alone = {g for g, n in survivors.items() if n < 2}
    kept = [t for t in kept if t.group not in alone]
    if not kept:
        failed = sum(t.failed or not t.steps for t in trajectories)
        raise RuntimeError(f"{failed} of {len(trajectories)} trajectories failed and no group kept two members: "
                           "nothing to train on (see the env warnings)")
    reward = torch.tensor([t.outcome_reward for t in kept], dtype=torch.float32)
    group = torch.tensor([t.group for t in kept], dtype=torch.long)
    adv = torch.zeros_like(reward)  # filled by the advantage stage
    rows = [(m, k, s) for m, t in enumerate(kept) for k, s in enumerate(t.steps)]
    width = max(len(s.prompt_ids) + len(s.response_ids) for _, _, s in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width))
    logp = torch.zeros((n, width))
    step_ids = torch.full((n, width), -1, dtype=torch.long)
    for r, (m, k, s) in enumerate(rows):
        p, q = len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids)
        input_ids[r, :q] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[r, :q] = 1
        loss_mask[r, p:q] = 1
        logp[r, p:q] = torch.tensor(s.rollout_logprobs)
        if s.target is not None:
            step_ids[r, p + s.target[0]:p + s.target[1]] = k
    row_traj = torch.tensor([m for m, _, _ in rows], dtype=torch.long)
    batch = RolloutBatch(
        input_ids, attention, loss_mask, logp, torch.zeros_like(loss_mask), step_ids, row_traj,
        torch.tensor([k for _, k, _ in rows], dtype=torch.long),
        torch.tensor([len(s.prompt_ids) for _, _, s in rows], dtype=torch.long),
        group, reward, torch.tensor([t.success for t in kept]), adv, tuple(kept))
    metrics = {
        "reward/mean": reward.mean().item(),
        "success/rate": batch.traj_success.float().mean().item(),
        "grpo/uniform_group_frac": uniform_group_fraction(reward, group),
        "rollout/failed_trajectories": sum(t.failed or not t.steps for t in trajectories),
        "rollout/dropped_groups": len({t.group for t in trajectories} - {t.group for t in kept}),
        "rollout/steps_per_traj": n / len(kept),
        "rollout/invalid_step_frac": sum(not s.transition.valid for _, _, s in rows) / n,
    }
    return batch, metrics
