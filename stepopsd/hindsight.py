"""Hindsight teacher contexts (spec §6, Eq. 2-3) on token ids.

For a step row with prompt P, response tokens y and target span Z = y[ts:te]:

    (Eq. 2) student context c^S = P ⊕ y[:ts]           — exactly what the policy saw
    (Eq. 3) teacher context c^T = P ⊕ y[:ts] ⊕ h_i     — the hindsight block right before Z

and both are followed by Z, whose tokens are rescored. The student side is the rollout row
itself, so nothing of h_i can reach it or the rollout. h_i is plain text:

    <hindsight>
    final_correctness: correct | incorrect
    peer_correct_trajectory:                 (failed member of a mixed group only)
    <peer_correct_trajectory>
    ...the group's first successful member, serialised and cut from the front to a token budget...
    </peer_correct_trajectory>
    </hindsight>

ALFWorld serialises a peer as its numbered action list (observations dropped) [spec choice].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from stepopsd.envs.alfworld.prompts import peer_lines as alfworld_peer_lines  # noqa: F401  (the default serialisation)
from stepopsd.types import Trajectory


def fit_from_front(lines: list[str], tokenizer, budget: int) -> str:
    """Join the lines, dropping whole lines from the front until the text fits `budget` tokens."""
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        n = len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
        if used + n > budget:
            break
        kept.append(line)
        used += n
    return "\n".join(reversed(kept))


def hindsight_text(success: bool, peer: str | None = None) -> str:
    """The hindsight block h_i (Eq. 3); `peer` only for a failed member of a mixed group."""
    lines = ["<hindsight>", f"final_correctness: {'correct' if success else 'incorrect'}"]
    if peer is not None:
        lines += ["peer_correct_trajectory:", "<peer_correct_trajectory>", peer, "</peer_correct_trajectory>"]
    return "\n" + "\n".join(lines + ["</hindsight>"]) + "\n"


def hindsight_blocks(trajectories: Sequence[Trajectory], tokenizer, *, peer_budget: int = 512,
                     serialise=alfworld_peer_lines) -> list[str]:
    """h_i for every trajectory: correctness, plus the first successful sibling for a failed member
    of a mixed group (0 < #successes < G)."""
    first_success: dict[int, Trajectory] = {}
    for t in trajectories:
        if t.success and t.group not in first_success:
            first_success[t.group] = t
    blocks = []
    for t in trajectories:
        peer = first_success.get(t.group)
        text = fit_from_front(serialise(peer), tokenizer, peer_budget) if (peer is not None and not t.success) else None
        blocks.append(hindsight_text(t.success, text))
    return blocks


@dataclass(frozen=True)
class TeacherInputs:
    """Teacher sequences for the rows with a target, and where their target tokens sit."""

    input_ids: torch.Tensor  # [R, L] right-padded teacher contexts ⊕ targets
    attention_mask: torch.Tensor  # [R, L]
    rows: torch.Tensor  # [R] batch row of each teacher sequence
    target_pos: torch.Tensor  # [R, Z] position of target token z in the teacher sequence (-1 = padding)
    batch_pos: torch.Tensor  # [R, Z] position of the same token in the batch row (-1 = padding)


def teacher_inputs(step_ids: torch.Tensor, input_ids: torch.Tensor, row_traj: torch.Tensor,
                   blocks: Sequence[str], tokenizer, *, pad_id: int) -> TeacherInputs:
    """Insert h_(row's trajectory) right before each row's target span (Eq. 3).

    step_ids, input_ids: [N, L] batch rows; row_traj: [N]; blocks: one h_i per trajectory.
    """
    block_ids = [tokenizer(b, add_special_tokens=False)["input_ids"] for b in blocks]
    seqs, rows, tpos, bpos = [], [], [], []
    for r in range(step_ids.shape[0]):
        cols = (step_ids[r] >= 0).nonzero().flatten()
        if len(cols) == 0:
            continue
        ts, te = int(cols[0]), int(cols[-1]) + 1  # the target span in batch coordinates
        h = block_ids[int(row_traj[r])]
        seqs.append(input_ids[r, :ts].tolist() + h + input_ids[r, ts:te].tolist())
        rows.append(r)
        tpos.append(list(range(ts + len(h), te + len(h))))
        bpos.append(list(range(ts, te)))
    n, width, zmax = len(seqs), max((len(s) for s in seqs), default=0), max((len(p) for p in tpos), default=0)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    target_pos = torch.full((n, zmax), -1, dtype=torch.long)
    batch_pos = torch.full((n, zmax), -1, dtype=torch.long)
    for i, (s, tp, bp) in enumerate(zip(seqs, tpos, bpos)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        target_pos[i, :len(tp)] = torch.tensor(tp)
        batch_pos[i, :len(bp)] = torch.tensor(bp)
    return TeacherInputs(ids, mask, torch.tensor(rows, dtype=torch.long), target_pos, batch_pos)
