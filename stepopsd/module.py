"""The GRPO LightningModule: PPO-clip updates on a `RolloutBatch` (Eq. 13-14), manual optimisation.

One training step = one rollout batch: `epochs` passes over random row mini-batches, each a
forward pass, the clipped surrogate with the advantages in the batch (plain GRPO, or StepOPSD's
after the TeacherRescoring callback reshaped them), k3 KL to a frozen reference, an entropy bonus,
gradient clipping and an optimizer step. Before the first update the trainer's log-probs must equal
the rollout's (the policy has not moved): their gap is logged every step and a gap past
`logp_gap_threshold` stops the run (weights not synced, tokenisation drift).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import lightning as L
import torch

from stepopsd.algorithms.grpo import AGGREGATIONS, aggregate, entropy_from_logits, kl_k3, policy_loss, ppo_stats
from stepopsd.data.batch import RolloutBatch
from stepopsd.policy.logprobs import left_align, tail_logprobs, tail_width


@dataclass(frozen=True)
class PPOConfig:
    lr: float = 1e-6
    warmup_steps: int = 0  # linear learning-rate warm-up over this many training steps (Search-QA: 10 %)
    weight_decay: float = 0.0
    epochs: int = 1
    mini_batch_rows: int = 256
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token_mean"
    kl_coef: float = 0.01
    entropy_coef: float = 0.001
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # the rollout's sampling temperature: log-probs are taken at the same scale
    logp_gap_threshold: float = 0.05  # max |trainer - rollout| log-prob (mean over tokens) before the first update

    def __post_init__(self):
        if self.lr <= 0 or self.epochs < 1 or self.mini_batch_rows < 1 or self.warmup_steps < 0:
            raise ValueError("ppo: lr must be > 0, epochs >= 1, mini_batch_rows >= 1 and warmup_steps >= 0")
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            raise ValueError(f"ppo: need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"ppo.agg={self.agg!r}: choose one of {', '.join(AGGREGATIONS)}")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.max_grad_norm <= 0 or self.temperature <= 0:
            raise ValueError("ppo: kl_coef and entropy_coef must be >= 0, max_grad_norm and temperature > 0")


class GRPOModule(L.LightningModule):
    def __init__(self, policy: torch.nn.Module, ppo: PPOConfig):
        super().__init__()
        self.policy = policy
        self.ppo = ppo
        self.automatic_optimization = False
        self.reference = None
        if ppo.kl_coef > 0:  # the frozen initial policy (kept separate from the teacher, spec §7)
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.policy.parameters(), lr=self.ppo.lr, weight_decay=self.ppo.weight_decay)
        warmup = self.ppo.warmup_steps
        # stepped once per training step (rollout batch), not per PPO mini-batch
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": schedule}

    def mini_batch_loss(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Eq. 14 on one mini-batch of right-padded rows (`RolloutBatch.rows`): the clipped surrogate,
        minus c_ent * entropy, plus beta_KL * k3 KL to the reference. The rows are left-aligned so that
        every response ends in the last column and the LM head runs on the response window only; the
        returned parts (detached log-probs, loss terms, the window's row tensors) are for the logs."""
        ppo = self.ppo
        rows = left_align(rows, rows["attention_mask"])
        keep = tail_width(rows["loss_mask"])
        tail = {k: v[:, -keep:] for k, v in rows.items()}
        mask = tail["loss_mask"]
        logp, logits = tail_logprobs(self.policy, rows["input_ids"], rows["attention_mask"], keep,
                                     temperature=ppo.temperature)
        pg = policy_loss(logp, tail["rollout_logp"], tail["advantages"], mask,
                         clip_low=ppo.clip_low, clip_high=ppo.clip_high, agg=ppo.agg)
        entropy = aggregate(entropy_from_logits(logits.float() / ppo.temperature), mask, ppo.agg)
        loss = pg - ppo.entropy_coef * entropy
        parts = {"logp": logp.detach(), "pg_loss": pg.detach(), "entropy": entropy.detach(), "tail": tail}
        if self.reference is not None:
            with torch.no_grad():
                ref, _ = tail_logprobs(self.reference, rows["input_ids"], rows["attention_mask"], keep,
                                       temperature=ppo.temperature)
            kl = aggregate(kl_k3(logp, ref), mask, ppo.agg)
            loss = loss + ppo.kl_coef * kl
            parts["kl_ref"] = kl.detach()
        return loss, parts

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        t0 = time.perf_counter()
        opt = self.optimizers()
        ppo = self.ppo
        self.policy.train()
        metrics: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(int(self.global_step))
        chunks = self._num_mini_batches(batch.num_rows)
        for epoch in range(ppo.epochs):
            order = torch.randperm(batch.num_rows, generator=gen)
            for i, idx in enumerate(torch.tensor_split(order, chunks)):
                weight = 1.0 if len(idx) else 0.0  # an empty share still joins the ranks' all-reduce
                rows = {k: v.to(self.device) for k, v in batch.rows(idx if len(idx) else order[:1]).items()}
                loss, parts = self.mini_batch_loss(rows)
                logp, tail = parts["logp"], parts["tail"]
                mask = tail["loss_mask"]
                if epoch == 0 and i == 0:
                    self._check_logp_gap(logp, tail["rollout_logp"], mask, metrics)
                if "kl_ref" in parts:
                    _add(metrics, "actor/kl_ref", parts["kl_ref"].item())
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss * weight)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), ppo.max_grad_norm)
                opt.step()
                stats = ppo_stats(logp, tail["rollout_logp"], tail["advantages"], mask,
                                  clip_low=ppo.clip_low, clip_high=ppo.clip_high)
                _add(metrics, "actor/pg_loss", parts["pg_loss"].item())
                _add(metrics, "actor/entropy", parts["entropy"].item())
                _add(metrics, "actor/grad_norm", grad_norm.item())
                for k in ("approx_kl", "clip_fraction", "ratio_mean"):
                    _add(metrics, f"actor/{k}", stats[k])
        lr = opt.param_groups[0]["lr"]  # the rate this step's updates used
        self.lr_schedulers().step()
        tokens = batch.attention_mask.sum().item()
        seconds = time.perf_counter() - t0
        logged = {k: sum(v) / len(v) for k, v in metrics.items()}
        logged |= {"time/update_s": seconds, "perf/update_tokens_per_s": tokens / seconds,
                   "train_step": float(self.current_epoch + 1),  # training steps done (one per Lightning epoch)
                   "actor/lr": lr}
        self.log_dict(logged, on_step=True, prog_bar=False, sync_dist=True, batch_size=batch.num_rows)
        return None

    def _num_mini_batches(self, rows: int) -> int:
        """ceil(rows / mini_batch_rows), the same on every rank: under DDP each backward is an all-reduce,
        so ranks with fewer rows split them into as many (smaller) mini-batches as the largest rank."""
        chunks = -(-rows // self.ppo.mini_batch_rows)
        if self.trainer.world_size > 1:
            chunks = int(self.trainer.strategy.reduce(torch.tensor(float(chunks), device=self.device), reduce_op="max"))
        return max(1, chunks)

    def on_train_end(self) -> None:
        """Under DDP, check that every rank ends with the same weights (a fingerprint per rank)."""
        if self.trainer.world_size < 2:
            return
        with torch.no_grad():  # per tensor: sum and sum of squares (no full-model copy, cheap at any size)
            params = list(self.policy.parameters())
            fingerprint = torch.stack([p.float().sum() for p in params] + [p.float().square().sum() for p in params])
            spread = self.trainer.strategy.reduce(fingerprint, reduce_op="max") - (
                -self.trainer.strategy.reduce(-fingerprint, reduce_op="max"))
        diff = spread.abs().max().item()
        if self.trainer.is_global_zero:
            print(f"[ddp] weight fingerprints across {self.trainer.world_size} ranks differ by at most {diff:.3g}")
        if diff > 1e-5 * max(1.0, fingerprint.abs().max().item()):
            raise RuntimeError(f"policy weights diverged across ranks (fingerprint spread {diff:.3g})")

    def _check_logp_gap(self, logp, rollout_logp, mask, metrics):
        """The policy has not been updated yet in this step: trainer and rollout log-probs must agree."""
        gap = ((logp - rollout_logp).abs() * mask).sum() / mask.sum().clamp(min=1)
        _add(metrics, "actor/rollout_logp_gap", gap.item())
        if gap.item() > self.ppo.logp_gap_threshold:
            raise RuntimeError(f"trainer and rollout log-probs differ by {gap.item():.4f} per token (threshold "
                               f"{self.ppo.logp_gap_threshold}): rollout weights not synced or tokenisation drift; "
                               "raise ppo.logp_gap_threshold only if you know why")


def _add(metrics: dict, key: str, value: float) -> None:
    metrics.setdefault(key, []).append(value)
