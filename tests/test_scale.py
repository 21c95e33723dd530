"""The paper path's numerics on shrunken real architectures (transformers' Qwen3 class, 2 layers, the real
151,936-token vocabulary where it matters): fp32 master weights under bf16 autocast, gradient accumulation
over micro-batches equal to one pass, the micro-batch split, and `model.init=random`."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from stepopsd.algorithms.grpo import AGGREGATIONS, aggregate, aggregation_norm
from stepopsd.data.batch import micro_batches
from stepopsd.module import GRPOModule, PPOConfig
from stepopsd.policy.loading import random_policy, task_tokenizer
from stepopsd.types import Task

from helpers.batches import synthetic_batch

QWEN3 = OmegaConf.to_container(OmegaConf.load("conf/model/qwen3_1.7b.yaml").arch)
SHRUNK = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
TASKS = [Task(f"train/heat-mug-none-microwave-{i}/trial_0", "heat", "x", "train", generated=True) for i in range(3)]


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer(TASKS)


def qwen3(tok, vocab: int | None = None, seed: int = 0):
    """A 2-layer Qwen3-1.7B: the repo's arch with the depth and widths shrunk (vocabulary real unless given)."""
    arch = QWEN3 | SHRUNK | ({"vocab_size": vocab} if vocab else {})
    return random_policy(arch, tok, seed=seed)


LENGTHS = [(7, 3), (4, 9), (12, 2), (3, 1), (9, 6), (5, 5), (2, 8)]


def accumulated(policy, batch, agg, **micro):
    ppo = PPOConfig(lr=1e-3, agg=agg, kl_coef=0.05, entropy_coef=0.01, mini_batch_rows=len(LENGTHS), **micro)
    module = GRPOModule(policy, ppo)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in module.reference.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    policy.zero_grad(set_to_none=True)
    out = module.accumulate(batch, torch.arange(batch.num_rows))
    return out, [p.grad.clone() for p in policy.parameters()]


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_accumulated_gradient_equals_one_pass(tok, agg):
    policy = qwen3(tok, vocab=512)
    batch = synthetic_batch(512, LENGTHS)
    one, grads = accumulated(copy.deepcopy(policy), batch, agg)
    for micro in (dict(micro_batch_rows=2), dict(micro_batch_rows=1), dict(micro_batch_tokens=30)):
        out, acc = accumulated(copy.deepcopy(policy), batch, agg, **micro)
        for k in ("pg_loss", "entropy", "kl_ref"):
            torch.testing.assert_close(out[k], one[k], rtol=1e-5, atol=1e-7)
        for a, b in zip(acc, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in grads[:3])
    # the sum of micro-batch means is NOT the one-pass value: the normaliser is what makes them agree
    if agg != "seq_mean_token_sum_norm":
        mask = batch.loss_mask
        halves = [aggregate(mask[s], mask[s], agg) for s in (slice(0, 3), slice(3, 7))]
        assert not torch.isclose(sum(halves), aggregate(mask, mask, agg))
        norm = aggregation_norm(mask, agg)
        torch.testing.assert_close(sum(aggregate(mask[s], mask[s], agg, norm=norm) for s in (slice(0, 3), slice(3, 7))),
                                   aggregate(mask, mask, agg))


def test_aggregation_norm_by_hand():
    mask = torch.tensor([[1., 1., 0.], [0., 0., 0.], [1., 0., 0.]])
    assert aggregation_norm(mask, "token_mean") == (3.0, 3)
    assert aggregation_norm(mask, "seq_mean_token_mean") == (2.0, 3)
    assert aggregation_norm(mask, "seq_mean_token_sum_norm") == (3.0, 3)
    values = torch.tensor([[2., 4., 9.], [5., 5., 5.], [6., 9., 9.]])
    # micro-batch of rows 0-1 under the whole batch's norm: token_mean (2 + 4) / 3; seq_mean (3 + 0) / 2;
    # Dr.GRPO (6 / 3 + 0 / 3) / 3
    assert aggregate(values[:2], mask[:2], "token_mean", norm=(3.0, 3)).item() == pytest.approx(2.0)
    assert aggregate(values[:2], mask[:2], "seq_mean_token_mean", norm=(2.0, 3)).item() == pytest.approx(1.5)
    assert aggregate(values[:2], mask[:2], "seq_mean_token_sum_norm", norm=(3.0, 3)).item() == pytest.approx(2 / 3)


def test_micro_batches_cover_every_row_once_within_budget():
    lengths = torch.tensor([10, 3, 50, 7, 7, 20])
    index = torch.tensor([11, 12, 13, 14, 15, 16])
    assert [m.tolist() for m in micro_batches(index, lengths, rows=6)] == [index.tolist()]  # fits: one pass, order kept
    parts = micro_batches(index, lengths, rows=4)
    assert [len(p) for p in parts] == [4, 2] and parts[0].tolist() == [13, 16, 11, 14]  # longest first
    parts = micro_batches(index, lengths, rows=6, tokens=40)
    assert sorted(sum((p.tolist() for p in parts), [])) == index.tolist()
    assert parts[0].tolist() == [13]  # a row over the budget goes alone
    lookup = dict(zip(index.tolist(), lengths.tolist()))
    assert all(len(p) * max(lookup[i] for i in p.tolist()) <= 40 for p in parts[1:])
    with pytest.raises(ValueError, match="rows >= 1"):
        micro_batches(index, lengths, rows=0)


def test_micro_batch_knobs_are_checked():
    with pytest.raises(ValueError, match="micro_batch_rows=300"):
        PPOConfig(mini_batch_rows=256, micro_batch_rows=300)
    with pytest.raises(ValueError, match="micro_batch_tokens=-1"):
        PPOConfig(micro_batch_tokens=-1)


def _update(policy, batch, *, bf16_master: bool):
    """One PPO update at the paper's lr 1e-6 under bf16 autocast; returns the fraction of weights that moved."""
    before = [p.detach().float().clone() for p in policy.parameters()]
    ppo = PPOConfig(lr=1e-6, kl_coef=0.0, entropy_coef=0.001, mini_batch_rows=batch.num_rows, micro_batch_rows=2)
    if bf16_master:  # what a bf16 model handed to the optimizer does (GRPOModule refuses it, so bypass it)
        module = GRPOModule(policy, ppo)
        module.policy = policy.to(torch.bfloat16)
        before = [p.detach().float().clone() for p in policy.parameters()]
    else:
        module = GRPOModule(policy, ppo)
    opt = module.configure_optimizers()["optimizer"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.accumulate(batch, torch.arange(batch.num_rows))
    opt.step()
    moved = sum(int((p.detach().float() != b).sum()) for p, b in zip(policy.parameters(), before))
    return moved / sum(b.numel() for b in before)


def test_fp32_master_weights_learn_at_lr_1e6_and_bf16_weights_do_not(tok):
    """The paper's precision (fp32 weights, bf16 autocast compute) moves the weights at lr 1e-6; the same
    update applied to bf16 weights leaves nearly all of them unchanged (below bf16's resolution)."""
    policy = qwen3(tok)  # real 151,936-token vocabulary
    batch = synthetic_batch(len(tok), LENGTHS[:4])
    fp32 = _update(copy.deepcopy(policy), batch, bf16_master=False)
    bf16 = _update(copy.deepcopy(policy), batch, bf16_master=True)
    assert fp32 > 0.5, f"fp32 master weights: only {fp32:.1%} moved"
    assert bf16 < 0.05, f"bf16 weights: {bf16:.1%} moved"
    with pytest.raises(ValueError, match="model.dtype=float32"):
        GRPOModule(copy.deepcopy(policy).to(torch.bfloat16), PPOConfig())


def test_random_init_builds_the_real_shapes(tok):
    policy = qwen3(tok)
    assert type(policy).__name__ == "Qwen3ForCausalLM" and policy.config.vocab_size == 151936
    assert len(policy.model.layers) == 2 and policy.config.eos_token_id == tok.eos_token_id
    again = qwen3(tok)
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), again.parameters()))  # seeded
    with pytest.raises(ValueError, match="model_type"):
        random_policy({"hidden_size": 8}, tok)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        random_policy(QWEN3 | SHRUNK | {"vocab_size": 10}, tok)


def _ddp_allreduce_buckets(micro_rows: int) -> int:
    """One Lightning DDP training step (1 process, gloo) over one 7-row mini-batch; returns how many gradient
    buckets DDP all-reduced (counted by a comm hook). Run in a subprocess: it starts a process group."""
    import lightning as L
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    calls = []

    def hook(state, bucket):
        calls.append(1)
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    class Count(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.model.register_comm_hook(None, hook)

    tok = task_tokenizer(TASKS)
    batch = synthetic_batch(512, LENGTHS)
    ppo = PPOConfig(lr=1e-3, kl_coef=0.0, mini_batch_rows=7, micro_batch_rows=micro_rows, logp_gap_threshold=1e3)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=1, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Count()])
    trainer.fit(GRPOModule(qwen3(tok, vocab=512), ppo),
                train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    return len(calls)


def test_under_ddp_only_the_last_micro_batch_all_reduces():
    import subprocess
    import sys

    def buckets(micro: int) -> int:
        code = f"import sys; sys.path.insert(0, 'tests'); import test_scale; print('BUCKETS', test_scale._ddp_allreduce_buckets({micro}))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split("BUCKETS")[-1])

    one_pass, four_micro = buckets(7), buckets(2)  # 1 backward vs 4 backwards (2 + 2 + 2 + 1 rows)
    assert one_pass >= 1 and four_micro == one_pass


def test_train_py_runs_the_paper_path_on_a_shrunken_random_qwen3(generated_games, tmp_path):
    """`model=qwen3_1.7b model.init=random` with the depth and widths shrunk: the paper code path (fp32 master
    weights under bf16-mixed, bf16 frozen reference and teacher, gradient checkpointing, PPO and teacher
    micro-batches) through the real entry point, no hub access."""
    import csv
    import subprocess
    import sys

    shrink = [f"model.arch.{k}={v}" for k, v in SHRUNK.items()]
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=alfworld_heat", "machine=cpu", "model=qwen3_1.7b", "model.init=random",
         *shrink, "trainer.precision=bf16-mixed", f"data.path={generated_games[0]}", "data.generate=null",
         f"hydra.run.dir={tmp_path}", "training_steps=1", "tasks_per_step=1", "group_size=2", "env.max_steps=2",
         "val_tasks=1", "val_samples=1", "rollout.max_new_tokens=8", "algorithm.ppo.micro_batch_rows=1",
         "algorithm.teacher.micro_batch_rows=1", "algorithm.ppo.entropy_coef=0.01"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[model.init=random] qwen3 with" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    (step,) = [r for r in rows if r.get("actor/pg_loss")]
    assert float(step["rollout/logp_gap_mean"]) < 0.05 and float(step["actor/grad_norm"]) > 0
    assert float(step["actor/kl_ref"]) >= 0 and "stepopsd/lambda" in step
    config = (tmp_path / "policy" / "config.json").read_text()
    assert '"num_hidden_layers": 2' in config and '"vocab_size": 151936' in config


def test_the_loss_keeps_no_float32_copy_of_the_logits_for_backward(tok):
    """What the PPO loss keeps for backward at the vocabulary's size: only the model's own logits (the
    float32 scaled logits and softmax of the log-prob and entropy terms are recomputed a row at a time), not
    the several [rows, T, vocab] float32 tensors a plain implementation saves."""
    policy = qwen3(tok, vocab=4096)
    batch = synthetic_batch(4096, LENGTHS[:4])
    module = GRPOModule(policy, PPOConfig(kl_coef=0.0, entropy_coef=0.01, mini_batch_rows=4))
    rows = batch.rows(torch.arange(4))
    keep = max(r for _, r in LENGTHS[:4])
    one_copy = 4 * keep * 4096 * 4  # bytes of one float32 [rows, keep, vocab] tensor
    saved = []
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}  # the (tied) LM head is not a copy

    def pack(t):
        big = t.numel() >= keep * 4096 and t.untyped_storage().data_ptr() not in weights
        saved.append(t.numel() * t.element_size() if big else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = module.mini_batch_loss(rows)
    loss.backward()  # and the recomputation gives a gradient
    assert sum(saved) <= 1.5 * one_copy, f"{sum(saved) / one_copy:.1f} float32 logits copies saved for backward"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
