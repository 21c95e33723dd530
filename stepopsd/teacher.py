"""Teacher rescoring: Δ from a hindsight teacher and the step-aware advantages (Eq. 2-12).

`rescore` takes a `RolloutBatch` with GRPO advantages and returns the shaped advantages plus
the diagnostics the paper uses to show the teacher is informative. The teacher is a stale snapshot
of the policy (`TeacherSnapshot`, refreshed every N_ref optimizer steps, or the live policy); its
passes run under `torch.no_grad()`. The student log-probs on the targets are the rollout's own
(on-policy, Eq. 2 is exactly the rollout context), so the student needs no forward pass.
"""
from __future__ import annotations

import copy

import torch

from stepopsd.algorithms.stepopsd import StepOPSDConfig, shape_advantages, sign_agreement, step_scores, token_gap
from stepopsd.data.batch import RolloutBatch, micro_batches
from stepopsd.hindsight import alfworld_peer_lines, hindsight_blocks, teacher_inputs
from stepopsd.policy.logprobs import left_align, tail_logprobs


class TeacherContextError(ValueError):
    """A teacher context longer than the teacher model accepts."""


class TeacherSnapshot:
    """π_T: a frozen copy of the policy, refreshed every `refresh` optimizer steps (0 = live policy),
    kept in `dtype` (None: the policy's; bfloat16 halves a 1.7B-3B teacher's memory). A refresh copies
    the policy's weights into the snapshot's dtype. Under trainer=fsdp the snapshot is taken before the policy
    is sharded and stays a whole replica on every rank; a refresh gathers the shards (`copy_full_weights`)."""

    def __init__(self, policy: torch.nn.Module, refresh: int, dtype: torch.dtype | None = None):
        self.refresh = refresh
        self.model = policy if refresh == 0 else self._copy(policy, dtype)
        self.taken_at = 0  # optimizer step of the snapshot

    @staticmethod
    def _copy(policy, dtype):
        model = copy.deepcopy(policy).to(dtype).eval()
        model.requires_grad_(False)
        return model

    def maybe_refresh(self, policy: torch.nn.Module, step: int) -> bool:
        if self.refresh == 0 or step - self.taken_at < self.refresh:
            return False
        state = policy.state_dict()
        if any(hasattr(v, "full_tensor") for v in state.values()):  # trainer=fsdp: DTensor shards
            copy_full_weights(state, self.model)
        else:
            self.model.load_state_dict(state)
        self.taken_at = step
        return True

    def state_dict(self) -> dict:
        """What a checkpoint must keep so a resumed run rescales with the same teacher."""
        return {"taken_at": self.taken_at, "weights": None if self.refresh == 0 else self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.taken_at = state["taken_at"]
        if state["weights"] is not None:
            self.model.load_state_dict(state["weights"])


@torch.no_grad()
def copy_full_weights(state: dict, model: torch.nn.Module) -> None:
    """`model` (a whole replica) <- `state`, a sharded policy's state dict (trainer=fsdp: DTensor shards),
    gathered one tensor at a time and cast to the replica's dtype. A collective: every rank calls it."""
    target = model.state_dict()
    if target.keys() != state.keys():
        raise KeyError(f"teacher and policy state dicts differ: {sorted(target.keys() ^ state.keys())[:4]}")
    for name, value in state.items():
        target[name].copy_(value.full_tensor() if hasattr(value, "full_tensor") else value)


@torch.no_grad()
def teacher_target_logprobs(model, batch: RolloutBatch, blocks: list[str], tokenizer, *, pad_id: int,
                            temperature: float = 1.0, micro_batch: int = 16, before: str = "target") -> torch.Tensor:
    """log π_T(target token | c^T, earlier target tokens) in batch coordinates [N, L] (0 off-target),
    on the batch's device. The teacher contexts are assembled on the host, scored on the teacher's device,
    `micro_batch` at a time, grouped by length (`micro_batches`, longest first) so that each pass pads its
    rows to a similar width: the contexts differ by hundreds of tokens (a failed row's block holds a
    successful peer's steps), and in batch order every pass was padded to about the longest context. `blocks`: one
    per trajectory, inserted `before` each row's target (hindsight, Eq. 3) or its prompt (SDAR's skill documents)."""
    ti = teacher_inputs(batch.step_ids.cpu(), batch.input_ids.cpu(), batch.row_traj.cpu(), blocks, tokenizer,
                        pad_id=pad_id, before=before)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and len(ti.rows) and (longest := int(ti.attention_mask.sum(1).max())) > limit:
        if before == "target":
            raise TeacherContextError(f"a hindsight context of {longest} tokens is longer than the teacher allows "
                                      f"({limit}, max_position_embeddings): lower algorithm.stepopsd.peer_budget_tokens "
                                      "or rollout.max_prompt_tokens")
        raise TeacherContextError(f"a skill-document context of {longest} tokens is longer than the teacher allows "
                                  f"({limit}, max_position_embeddings): shorten the documents in "
                                  "algorithm.teacher.skills_dir or lower rollout.max_prompt_tokens")
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    device = next(model.parameters()).device
    parts = micro_batches(torch.arange(len(ti.rows)), ti.attention_mask.sum(1), rows=micro_batch) if len(ti.rows) else []
    for sl in parts:
        mask = ti.attention_mask[sl]
        width = int(mask.sum(1).max())
        tpos, bpos = ti.target_pos[sl], ti.batch_pos[sl]
        valid = tpos >= 0
        # left-align: the targets close each teacher row, so the LM head runs on the target window only
        shift = width - mask[:, :width].sum(1, keepdim=True)
        left = left_align({"ids": ti.input_ids[sl, :width], "mask": mask[:, :width]}, mask[:, :width])
        tpos = torch.where(valid, tpos + shift, 0)
        keep = width - int(tpos[valid].min()) if valid.any() else 1
        logp, _ = tail_logprobs(model, left["ids"].to(device), left["mask"].to(device), keep, temperature=temperature)
        logp = logp.float().cpu()
        rows = ti.rows[sl][:, None].expand_as(tpos)
        out[rows[valid], bpos[valid]] = logp.gather(1, (tpos - (width - keep)).clamp(min=0))[valid]
    return out.to(batch.input_ids.device)


def rescore(batch: RolloutBatch, teacher: torch.nn.Module, tokenizer, cfg: StepOPSDConfig, step: int, *,
            pad_id: int, temperature: float = 1.0, student_logp: torch.Tensor | None = None,
            micro_batch: int = 16, peer_lines=alfworld_peer_lines, budget_on: str = "advantage",
            context=None) -> tuple[torch.Tensor, dict]:
    """Shaped advantages [N, L] (Eq. 6-12) and diagnostics. `student_logp` defaults to the rollout's; `budget_on`:
    what the per-step budget equalises (`shape_advantages`); `context`: None, the hindsight blocks (Eq. 3), or a
    callable giving (one block per trajectory, where it goes: `teacher_target_logprobs`'s `before`) for the batch's
    trajectories (`algorithm.teacher.context=skills`), called only when the teacher runs."""
    lam = cfg.lam(step)
    target = (batch.step_ids >= 0) & (batch.loss_mask > 0)
    metrics = {"stepopsd/lambda": lam, "stepopsd/target_token_frac": target.sum().item() / max(1.0, batch.loss_mask.sum().item())}
    if lam == 0.0:  # exactly GRPO: no teacher pass at all
        return batch.advantages.clone(), metrics
    if context is None:
        blocks, before = hindsight_blocks(batch.trajectories, tokenizer, peer_budget=cfg.peer_budget_tokens,
                                          serialise=peer_lines), "target"
    else:
        blocks, before = context(batch.trajectories)
    teacher_logp = teacher_target_logprobs(teacher, batch, blocks, tokenizer, pad_id=pad_id,
                                           temperature=temperature, micro_batch=micro_batch, before=before)
    student = batch.rollout_logp if student_logp is None else student_logp
    delta = token_gap(teacher_logp, student, target)  # Eq. 4
    step_ids = torch.where(target, batch.step_ids, -1)  # targets inside the loss mask only
    shaped = shape_advantages(batch.advantages, delta, step_ids, batch.loss_mask,
                              alpha_clip=cfg.alpha_clip, lam=lam, weight_fn=cfg.weight_fn,
                              budget_clip=cfg.budget_clip, traj_ids=batch.row_traj, budget_on=budget_on)
    scores = step_scores(delta, step_ids)  # Eq. 5
    success = batch.traj_success[batch.row_traj[scores.rows]]
    nonzero = (batch.advantages != 0) & (batch.loss_mask > 0)
    ratio = (shaped[nonzero] / batch.advantages[nonzero] - 1).abs()
    metrics |= {
        "stepopsd/delta_mean": delta[target].mean().item() if target.any() else 0.0,
        "stepopsd/step_score_mean": scores.scores.mean().item() if len(scores.scores) else 0.0,
        "stepopsd/step_sign_agreement": sign_agreement(scores.scores, success),
        "stepopsd/shaped_token_frac": ((shaped != batch.advantages) & nonzero).sum().item() / max(1, int(nonzero.sum())),
        "stepopsd/abs_ratio_dev": ratio.mean().item() if len(ratio) else 0.0,
    }
    return shaped, metrics
