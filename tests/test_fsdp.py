"""trainer=fsdp: the policy sharded with FSDP2 (`fully_shard` in GRPOModule.configure_model) under Lightning's
ModelParallelStrategy, on 2 CPU processes (gloo).

- One update, unit level (2 spawned processes, no Trainer): ranks hold different rows and split them into
  different numbers of micro-batches; the sharded update (micro-batch padding, reduce-scatter, clip over DTensor
  shards, sharded AdamW) equals the unsharded update with the ranks' averaged gradient, to float tolerance.
  Rollouts inside `full_weights()` call `generate` a different number of times per rank (no collective inside)
  and their log-probs equal the training forward's, in fp32 and with bf16 gathered weights.
- The real train.py (Lightning's launcher, 2 processes): trainer=fsdp ends with the same weights as trainer=ddp
  on the same run (both average the same gradients), the same metrics, a tiny on-policy gap, identical gathered
  weights on both ranks, sharded checkpoint folders, and a run resumed from one equals the run straight through.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers.batches import synthetic_batch
from helpers.dist import free_port, shard, tiny_qwen3
from helpers.runs import run_train, tiny_overrides, train_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- one update, unit level -----------------------------------------------------------------------------------

ROWS = {0: [(7, 3), (4, 9), (12, 2), (3, 1), (9, 6), (5, 5), (2, 8)], 1: [(7, 3), (4, 9), (12, 2)]}  # 3 vs 2 micro-batches


def _module(policy, sharding=None):
    from stepopsd.module import GRPOModule, PPOConfig

    ppo = PPOConfig(lr=1e-3, kl_coef=0.05, entropy_coef=0.01, mini_batch_rows=8, micro_batch_tokens=30, max_grad_norm=0.05)
    module = GRPOModule(policy, ppo, sharding=sharding)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in module.reference.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    return module


def _rollout_gap(module, rank, autocast: bool) -> float:
    """Generate inside full_weights (rank r calls generate r + 1 times), then score the last generation with the
    training forward (outside: the shards gathered per layer, as in training_step): max |log-prob gap|."""
    from stepopsd.policy.backends.base import SamplingParams
    from stepopsd.policy.backends.hf import HFBackend
    from stepopsd.policy.logprobs import tail_logprobs

    backend = HFBackend(module.policy, SimpleNamespace(eos_token_id=1, pad_token_id=0))
    prompt = torch.randint(2, 64, (6,), generator=torch.Generator().manual_seed(rank)).tolist()
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with cast, module.full_weights():
        for i in range(rank + 1):
            (gen,) = backend.generate([prompt], SamplingParams(max_new_tokens=4 + 3 * i), seed=i)
    ids = torch.tensor([prompt + list(gen.token_ids)])
    with cast, torch.no_grad():
        logp, _ = tail_logprobs(module.policy, ids, torch.ones_like(ids), len(gen.token_ids))
    return (logp[0] - torch.tensor(gen.logprobs)).abs().max().item()


def _update_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from stepopsd.data.batch import micro_batches
    from stepopsd.policy.sharding import ShardingConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = synthetic_batch(64, ROWS[rank], seed=rank)
        index = torch.arange(batch.num_rows)
        # unsharded: this rank's gradient, averaged over the ranks, clipped, one AdamW step
        plain = _module(tiny_qwen3())
        plain_opt = plain.configure_optimizers()["optimizer"]
        plain.accumulate(batch, index)
        for p in plain.policy.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        plain_norm = plain._clip_gradients().item()
        plain_opt.step()
        # sharded: the same update under FSDP2 (after a rollout inside full_weights)
        module = shard(_module(tiny_qwen3(), ShardingConfig()), world)
        opt = module.configure_optimizers()["optimizer"]  # over the shards (Lightning: right after configure_model)
        gap = _rollout_gap(module, rank, autocast=False)
        module.accumulate(batch, index)
        norm = module._clip_gradients()
        opt.step()
        diff = max((p.full_tensor() - q).abs().max().item()
                   for p, q in zip(module.policy.parameters(), plain.policy.parameters()))
        scale = max(q.abs().max().item() for q in plain.policy.parameters())
        # bf16 gathered weights (bf16-mixed): rollout and training forward use the same gathered bf16 weights
        bf16 = shard(_module(tiny_qwen3(), ShardingConfig(param_dtype="bfloat16")), world)
        bf16_gap = _rollout_gap(bf16, rank, autocast=True)
        torch.save(dict(
            micro=len(micro_batches(index, batch.attention_mask.sum(1), rows=8, tokens=30)),
            dtensor=all(isinstance(p, DTensor) for p in module.policy.parameters()),
            norm=norm.item(), plain_norm=plain_norm, diff=diff, scale=scale, gap=gap, bf16_gap=bf16_gap,
            bf16_layer=str(bf16.policy.model.layers[0].mlp.up_proj.weight.dtype),
        ), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_one_fsdp_update_equals_the_unsharded_update_and_rollouts_match_the_trainer(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_update_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["micro"] for r in ranks] == [3, 2]  # rank 1 pads one zero-weight micro-batch
    for r in ranks:
        assert r["dtensor"]
        assert r["norm"] == pytest.approx(r["plain_norm"], rel=1e-5) and r["norm"] > 0.05  # clipping was active
        assert r["diff"] <= 1e-6 * r["scale"], r  # lr 1e-3 moved the weights by ~1e-3; the two updates agree
        assert r["gap"] < 1e-5, r  # fp32: the gathered weights are the weights
        assert r["bf16_gap"] < 1e-3, r
        assert r["bf16_layer"] == "torch.float32"  # the shards (a layer outside its forward) stay fp32
    assert ranks[0]["norm"] == ranks[1]["norm"]


# --- the real train.py -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


BOTH = ["experiment=alfworld_heat", "machine=cpu", "algorithm=stepopsd", "trainer.devices=2", "env.num_workers=1",
        "algorithm.ppo.kl_coef=0.05", "algorithm.ppo.micro_batch_tokens=600", "algorithm.stepopsd.teacher_refresh=1",
        "val_every=0"]


@pytest.fixture(scope="module")
def runs(games, tmp_path_factory):
    """The same 2-step, 2-process run under trainer=ddp and trainer=fsdp (checkpoint every step)."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # shared with test_train_e2e
    out = {}
    for name, extra in (("ddp", ["trainer.strategy=ddp"]),
                        ("fsdp", ["trainer=fsdp", "callbacks.checkpoint_every=1", "callbacks.keep_checkpoints=-1"])):
        out[name] = tmp_path_factory.mktemp(name)
        proc = run_train(*BOTH[:2], *tiny_overrides(games, cache, out[name]), *BOTH[2:], *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name + "_stdout"] = proc.stdout
    return out


def test_fsdp_trains_like_ddp_with_identical_gathered_weights(runs):
    assert "[fsdp] gathered weight fingerprints across 2 ranks differ by at most 0" in runs["fsdp_stdout"]
    _, ddp = train_rows(runs["ddp"])
    _, fsdp = train_rows(runs["fsdp"])
    assert len(fsdp) == 2 and all(float(r["rollout/episodes"]) == 4.0 for r in fsdp)
    assert all(float(r["rollout/logp_gap_mean"]) < 1e-5 for r in fsdp)
    for a, b in zip(ddp, fsdp):  # the same rollouts and losses, the same gradient norm to float tolerance
        for key in ("reward/mean", "stepopsd/lambda", "stepopsd/teacher_refreshed"):
            assert a[key] == b[key], key
        for key in ("actor/pg_loss", "actor/entropy", "actor/kl_ref", "actor/grad_norm", "stepopsd/delta_mean"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-7), key
    a = load_file(str(runs["ddp"] / "policy" / "model.safetensors"))
    b = load_file(str(runs["fsdp"] / "policy" / "model.safetensors"))
    assert a.keys() == b.keys()  # the tied LM head saved once, as save_pretrained does unsharded
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert json.load(open(runs["fsdp"] / "policy" / "config.json"))["architectures"] == ["Qwen3ForCausalLM"]


def test_fsdp_resumes_from_a_sharded_checkpoint_exactly(games, runs, tmp_path_factory):
    ckpts = runs["fsdp"] / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["last.ckpt", "step0001.ckpt", "step0002.ckpt"]
    assert {"meta.pt", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(ckpts / "step0001.ckpt"))  # a folder: one shard per rank
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    resumed = tmp_path_factory.mktemp("fsdp-resumed")
    proc = run_train(*BOTH[:2], *tiny_overrides(games, cache, resumed), *BOTH[2:], "trainer=fsdp",
                     f"ckpt_path={ckpts / 'step0001.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, straight = train_rows(runs["fsdp"])
    _, again = train_rows(resumed)
    assert len(again) == 1  # only the second step ran
    for key in ("stepopsd/lambda", "stepopsd/teacher_age", "reward/mean", "actor/pg_loss", "actor/grad_norm"):
        assert again[0][key] == straight[1][key], key
    a = load_file(str(runs["fsdp"] / "policy" / "model.safetensors"))
    b = load_file(str(resumed / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different weights"
