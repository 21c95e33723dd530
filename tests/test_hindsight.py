"""Hindsight contexts (`stepopsd.hindsight`, Eq. 3): the per-trajectory blocks of a group (the first successful
member's numbered actions for its failed members, correctness only otherwise), the peer list's token budget cut
from the front in whole lines, and the teacher inputs that insert a block before each step's target span while the
student's rows stay untouched.

Hand-made step records on a word tokenizer (`helpers.records`), no engine and no model.
"""
from __future__ import annotations

import torch

from stepopsd.hindsight import alfworld_peer_lines, fit_from_front, hindsight_blocks, hindsight_text, teacher_inputs
from stepopsd.spans import decode

from helpers.records import WIN_PLAN, ids_of, make_step, make_traj, tok  # noqa: F401  (tok: a fixture)


def test_hindsight_blocks_mixed_and_uniform_groups(tok):
    trajs = [
        make_traj(tok, 0, 0, ["go to fridge 1", "look"]),  # failed member of a mixed group
        make_traj(tok, 0, 1, WIN_PLAN, win=True),  # the first success
        make_traj(tok, 0, 2, ["inventory"]),  # failed member of a mixed group
        make_traj(tok, 0, 3, ["go to countertop 1", "clean mug 1 with sinkbasin 1"], win=True),  # a later success
        make_traj(tok, 1, 0, ["look"]),  # uniform group (all failed)
        make_traj(tok, 1, 1, [None]),
        make_traj(tok, 2, 0, ["look"], win=True),  # uniform group (all won)
        make_traj(tok, 2, 1, ["inventory"], win=True),
    ]
    blocks = hindsight_blocks(trajs, tok, peer_budget=512)
    # the numbered action list of the FIRST successful member; the invalid step 3 is dropped,
    # the others keep their step numbers
    peer = "1. go to countertop 1\n2. take mug 1 from countertop 1\n4. clean mug 1 with sinkbasin 1"
    assert alfworld_peer_lines(trajs[1]) == peer.split("\n")
    failed_block = ("\n<hindsight>\nfinal_correctness: incorrect\npeer_correct_trajectory:\n"
                    f"<peer_correct_trajectory>\n{peer}\n</peer_correct_trajectory>\n</hindsight>\n")
    assert blocks[0] == blocks[2] == failed_block
    correct = "\n<hindsight>\nfinal_correctness: correct\n</hindsight>\n"
    incorrect = "\n<hindsight>\nfinal_correctness: incorrect\n</hindsight>\n"
    assert blocks[1] == blocks[3] == correct  # successes: correctness only
    assert blocks[4:6] == [incorrect, incorrect]  # uniform failures: no peer to show
    assert blocks[6:8] == [correct, correct]
    assert all("peer" not in b for b in blocks[1:2] + blocks[3:])


def test_fit_from_front_drops_whole_lines(tok):
    lines = alfworld_peer_lines(make_traj(tok, 0, 0, WIN_PLAN, win=True))
    cost = [len(ids_of(tok, line + "\n")) for line in lines]
    last_two = cost[-2] + cost[-1]
    assert fit_from_front(lines, tok, last_two) == "\n".join(lines[-2:])
    assert len(ids_of(tok, fit_from_front(lines, tok, last_two) + "\n")) == last_two  # fits exactly
    assert fit_from_front(lines, tok, last_two - 1) == lines[-1]
    assert fit_from_front(lines, tok, sum(cost)) == "\n".join(lines)
    assert fit_from_front(lines, tok, cost[-1] - 1) == ""
    # the budget reaches the peer block through hindsight_blocks
    trajs = [make_traj(tok, 0, 0, ["look"]), make_traj(tok, 0, 1, WIN_PLAN, win=True)]
    block = hindsight_blocks(trajs, tok, peer_budget=last_two)[0]
    assert f"<peer_correct_trajectory>\n{lines[-2]}\n{lines[-1]}\n</peer_correct_trajectory>" in block
    assert lines[0] not in block


def test_teacher_inputs_insert_hindsight_before_target(tok):
    pad = tok.pad_token_id
    steps = [make_step(tok, 0, "go to countertop 1"), make_step(tok, 1, "take mug 1 from countertop 1"),
             make_step(tok, 2, None)]  # the last row has no target
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in steps) + 2
    input_ids = torch.full((3, width), pad)
    step_ids = torch.full((3, width), -1)
    spans = []
    for r, s in enumerate(steps):
        row = list(s.prompt_ids + s.response_ids)
        input_ids[r, :len(row)] = torch.tensor(row)
        if s.target is not None:
            ts, te = len(s.prompt_ids) + s.target[0], len(s.prompt_ids) + s.target[1]
            step_ids[r, ts:te] = r + 3  # any step index
            spans.append((r, ts, te))
    row_traj = torch.tensor([1, 0, 0])
    blocks = [hindsight_text(True), hindsight_text(False, "1. go to countertop 1\n2. look")]
    before = input_ids.clone()
    ti = teacher_inputs(step_ids, input_ids, row_traj, blocks, tok, pad_id=pad)

    assert ti.rows.tolist() == [0, 1]  # row 2 has no target: skipped
    for i, (r, ts, te) in enumerate(spans):
        h = ids_of(tok, blocks[int(row_traj[r])])
        expected = input_ids[r, :ts].tolist() + h + input_ids[r, ts:te].tolist()
        n = len(expected)
        assert ti.input_ids[i, :n].tolist() == expected
        assert ti.attention_mask[i, :n].eq(1).all() and ti.attention_mask[i, n:].eq(0).all()
        assert ti.input_ids[i, n:].eq(pad).all()
        z = te - ts
        assert ti.target_pos[i, :z].tolist() == list(range(ts + len(h), te + len(h)))
        assert ti.batch_pos[i, :z].tolist() == list(range(ts, te))
        assert ti.target_pos[i, z:].eq(-1).all() and ti.batch_pos[i, z:].eq(-1).all()
        # the same token ids on both sides
        assert torch.equal(ti.input_ids[i, ti.target_pos[i, :z]], input_ids[r, ti.batch_pos[i, :z]])
        assert decode(tok, ti.input_ids[i, ti.target_pos[i, :z]].tolist()).startswith("<action>")
    # the student side (the batch rows) never sees the hindsight block
    assert torch.equal(input_ids, before)
    for tag in ("<hindsight>", "</hindsight>", "<peer_correct_trajectory>"):
        tag_id = tok.convert_tokens_to_ids(tag)
        assert not (input_ids == tag_id).any() and (ti.input_ids == tag_id).any()
    # no target anywhere: nothing to rescore
    empty = teacher_inputs(torch.full((2, 4), -1), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 0]),
                           blocks[:1], tok, pad_id=pad)
    assert empty.input_ids.shape[0] == 0 and empty.rows.numel() == 0
