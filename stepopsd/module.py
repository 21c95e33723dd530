"""The GRPO LightningModule: PPO-clip updates on a `RolloutBatch` (Eq. 13-14), manual optimisation.

One training step = one rollout batch: `epochs` passes over random row mini-batches (one optimizer
step each), each split into micro-batches (`micro_batch_rows` rows, or a token budget) whose
gradients accumulate before the step, with every loss term normalised over the whole mini-batch so
the gradient does not depend on the split; under DDP only the last micro-batch all-reduces. Per
micro-batch: a forward pass, the clipped surrogate with the advantages in the batch (the configured estimator's,
written by the AdvantageStage callback), k3 KL to a frozen reference, an entropy
bonus and a backward pass; per mini-batch: gradient clipping and an optimizer step. Before the first update the trainer's log-probs must equal
the rollout's (the policy has not moved): their gap is logged every step (`rollout/logp_gap_mean`, `_max`) and a
mean gap past `logp_gap_threshold` stops the run (weights not synced, tokenisation drift). With
`rollout_is_cap` (truncated importance sampling, for an engine such as vLLM whose log-probs drift slightly) the
trainer's pi_old is recomputed over the whole batch first: Eq. 13's ratio is taken against it and each token's
loss is weighted by min(pi_old / pi_rollout, cap).

Under trainer=fsdp (ModelParallelStrategy) `configure_model` shards the policy with FSDP2: every micro-batch
reduce-scatters, all ranks run as many micro-batches, and rollouts run inside `full_weights()`
(experiments/launch/README.md, "FSDP").

Several ranks (trainer=ddp / fsdp) hold different rows (ALFWorld's rows follow episode lengths). One update is
one pass over the union of their rows, as in one process:
- mini-batches: `mini_batch_rows` is the global mini-batch; the number of optimizer steps is ceil(all ranks'
  rows / mini_batch_rows), the same on every rank, and each rank cuts its own shuffled rows into that many
  near-equal parts: optimizer step i trains on the union of every rank's part i (a rank with fewer rows than
  steps joins the empty ones with a zero-weight stand-in row, so the collectives still match);
- normalisers: every term of Eq. 14 (surrogate, entropy, KL) divides by the union's count for its aggregation
  mode (tokens, non-empty rows or rows, summed over ranks; Dr.GRPO's horizon the widest rank's), and each rank's
  backward is scaled by the world size, because DDP and FSDP average gradients over ranks (verl's `agg_loss`);
- decisions: the log-prob gap, a non-finite update (and, elsewhere, env and teacher failures) are decided on
  values reduced across ranks (`stepopsd.ranks`), so every rank stops, or skips, in the same step.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import replace

import lightning as L
import torch
import torch.utils.checkpoint

from stepopsd import ranks
from stepopsd.algorithms.distill import DistillTerm, sdar_token_loss
from stepopsd.algorithms.grpo import (PPOConfig, aggregate, aggregation_counts, aggregation_norm,
                                     entropy_from_logits, kl_k3, policy_loss, ppo_stats, truncated_is_weights)
from stepopsd.data.batch import RolloutBatch, micro_batches
from stepopsd.errors import RunFailed, UserError
from stepopsd.faults import maybe_kill
from stepopsd.policy.logprobs import (left_align, right_align, tail_logits, tail_logprobs, tail_width,
                                      token_logprobs)
from stepopsd.policy.sharding import ShardingConfig, full_state_dict, gathered, is_sharded, shard_policy


LOGP_GAP_MEAN = "rollout/logp_gap_mean"  # metric names other code reads (experiments/gpu_checks/paper_shapes.py)
LOGP_GAP_MAX = "rollout/logp_gap_max"
UPDATE_PEAK_GPU_GB = "perf/update_peak_gpu_gb"


class GRPOModule(L.LightningModule):
    """`policy`'s trainable weights must be float32 (the optimizer's master copy; compute in bf16 comes
    from `trainer.precision=bf16-mixed`); the frozen KL reference is kept in `frozen_dtype`.

    Under `trainer=fsdp` (Lightning's ModelParallelStrategy) `configure_model` shards the policy with FSDP2
    (`sharding`); the KL reference and the teacher snapshot stay whole, frozen replicas on every rank (in
    `frozen_dtype`: bf16 at 1.7B-3B, 3.4-6 GB). Rollouts and validation run inside `full_weights()`."""

    def __init__(self, policy: torch.nn.Module, ppo: PPOConfig, *, frozen_dtype: torch.dtype | None = None,
                 sharding: ShardingConfig | None = None):
        super().__init__()
        self.sharding = sharding  # used only when the strategy provides a device mesh (trainer=fsdp)
        low = sorted({str(p.dtype) for p in policy.parameters() if p.requires_grad and p.dtype != torch.float32})
        if low:
            raise ValueError(f"the policy's trainable weights are {', '.join(low)}: AdamW would update them in place "
                             "below their resolution; load the policy in float32 (model.dtype=float32) and run "
                             "trainer.precision=bf16-mixed")
        self.policy = policy
        self.ppo = ppo
        self.automatic_optimization = False
        self.nonfinite_streak = 0  # PPO updates skipped in a row for a non-finite loss or gradient
        self.reference = None
        if ppo.kl_coef > 0:  # the frozen initial policy (kept separate from the teacher, spec §7)
            self.reference = copy.deepcopy(policy).to(frozen_dtype).eval().requires_grad_(False)

    # --- trainer=fsdp: sharding and full weights --------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether the policy is sharded with FSDP2 (trainer=fsdp, after `configure_model`)."""
        return is_sharded(self.policy)

    def configure_model(self) -> None:
        """trainer=fsdp: shard the policy with FSDP2 over the data-parallel mesh (`sharding.shard_policy`).
        Without a device mesh (single device, DDP) nothing happens. The frozen KL reference is not sharded."""
        if self.device_mesh is not None and not self.sharded:
            precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
            shard_policy(self.policy, self.device_mesh, self.sharding or ShardingConfig(), precision)

    def full_weights(self):
        """A context with the policy's full weights (rollouts, validation, a live-policy teacher): under FSDP the
        shards gathered once on entry (a collective: every rank enters), elsewhere a no-op (`sharding.gathered`)."""
        return gathered(self.policy, self.sharding or ShardingConfig()) if self.sharded else contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP: the policy's full state dict on global rank 0 (a collective); otherwise None (the
        policy's own `state_dict()` is already full)."""
        return full_state_dict(self.policy) if self.sharded else None

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.policy.parameters(), lr=self.ppo.lr, weight_decay=self.ppo.weight_decay)
        warmup = self.ppo.warmup_steps
        # stepped once per training step (rollout batch), not per PPO mini-batch
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": schedule}

    def mini_batch_loss(self, rows: dict[str, torch.Tensor], norm: tuple[float, int] | None = None,
                        distill: DistillTerm | None = None) -> tuple[torch.Tensor, dict]:
        """Eq. 14 on one mini-batch of right-padded rows (`RolloutBatch.rows`): the clipped surrogate,
        minus c_ent * entropy, plus beta_KL * k3 KL to the reference. With `norm` (`aggregation_norm` of
        the whole mini-batch's response window) the rows are one micro-batch of it and every term is
        this micro-batch's share, so the shares add up to the mini-batch's loss. The rows are
        left-aligned so that every response ends in the last column and the LM head runs on the
        response window only; the returned parts (detached log-probs, loss terms, the window's row
        tensors) are for the logs. With an estimator's `distill` term (rows holding `teacher_logp`) the loss is
        pg_coef * surrogate + coef * agg(g_t (log pi_T - log pi_theta)) over the target tokens, with the
        surrogate's own normaliser (`stepopsd.algorithms.distill`)."""
        ppo = self.ppo
        rows = left_align(rows, rows["attention_mask"])
        keep = tail_width(rows["loss_mask"])
        tail = {k: v[:, -keep:] for k, v in rows.items()}
        mask = tail["loss_mask"]
        norm = norm or aggregation_norm(mask, ppo.agg)
        logits = tail_logits(self.policy, rows["input_ids"], rows["attention_mask"], keep)
        logp, token_entropy = logp_and_entropy(logits, rows["input_ids"][:, -keep:], ppo.temperature)
        old, weights = tail["rollout_logp"], None
        if "trainer_logp" in tail:  # rollout_is_cap: PPO against the trainer's pi_old, TIS for the engine's drift
            old, weights = tail["trainer_logp"], truncated_is_weights(tail["trainer_logp"], old, ppo.rollout_is_cap)
        pg = policy_loss(logp, old, tail["advantages"], mask, clip_low=ppo.clip_low, clip_high=ppo.clip_high,
                         agg=ppo.agg, norm=norm, weights=weights)
        entropy = aggregate(token_entropy, mask, ppo.agg, norm=norm)
        del logits
        parts = {"logp": logp.detach(), "pg_loss": pg.detach(), "entropy": entropy.detach(), "tail": tail}
        policy_term = pg
        if distill is not None:  # SDAR's self-distillation term (OPSD alone: pg_coef 0)
            target = ((tail["step_ids"] >= 0) & (mask > 0)).to(logp.dtype)
            sd = aggregate(sdar_token_loss(tail["teacher_logp"], logp, distill.gate_beta) * target, mask, ppo.agg,
                           norm=norm)
            policy_term = distill.pg_coef * pg + distill.coef * sd
            parts["distill_loss"] = sd.detach()
        # entropy is a diagnostic when c_ent = 0: kept out of the loss, so backward skips its softmax
        loss = policy_term - ppo.entropy_coef * entropy if ppo.entropy_coef else policy_term
        if self.reference is not None:
            with torch.no_grad():
                ref, _ = tail_logprobs(self.reference, rows["input_ids"], rows["attention_mask"], keep,
                                       temperature=ppo.temperature)
            kl = aggregate(kl_k3(logp, ref), mask, ppo.agg, norm=norm)
            loss = loss + ppo.kl_coef * kl
            parts["kl_ref"] = kl.detach()
        return loss, parts

    def accumulate(self, batch: RolloutBatch, index: torch.Tensor, *, weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Forward and backward of one mini-batch (rows `index`) in micro-batches, gradients accumulated
        (not zeroed here, no optimizer step); under DDP only the last micro-batch all-reduces. Returns the
        mini-batch's loss terms (the union's over all ranks, for the logs) and, flattened over its response
        tokens, log-probs / rollout log-probs / advantages for the diagnostics. `weight` 0: this rank has no
        rows in this mini-batch (`index` is a stand-in row that joins the collectives with no gradient).

        Across ranks (Eq. 14 over the union of the ranks' rows): the normaliser is `global_norm`'s, and each
        rank's backward is scaled by the world size, so that DDP's / FSDP's gradient averaging gives the
        gradient of one pass over the union."""
        ppo = self.ppo
        masks = batch.rows(index)  # the whole mini-batch's response window fixes every term's normaliser
        whole = left_align({"loss_mask": masks["loss_mask"]}, masks["attention_mask"])["loss_mask"]
        norm = self.global_norm(whole[:, -tail_width(whole):], counted=weight > 0)
        world = ranks.world_size()
        lengths = batch.attention_mask[index].sum(1)
        parts = micro_batches(index, lengths, rows=ppo.micro_batch_rows or ppo.mini_batch_rows,
                              tokens=ppo.micro_batch_tokens)
        sums: dict[str, torch.Tensor] = {}
        flat: dict[str, list[torch.Tensor]] = {"logp": [], "old_logp": [], "rollout_logp": [], "advantages": []}
        real = len(parts)
        parts = parts + parts[:1] * self._micro_batch_padding(real)
        for j, micro in enumerate(parts):
            rows = {k: v.to(self.device) for k, v in batch.rows(micro).items()}
            with self._grad_sync(j == len(parts) - 1):
                loss, out = self.mini_batch_loss(rows, norm, batch.distill)
                scale = weight * world if j < real else 0.0  # padding: a pass with no gradient (_micro_batch_padding)
                if self._trainer is not None:
                    self.manual_backward(loss * scale)
                else:  # outside a Trainer (tests, benchmarks): plain autograd
                    (loss * scale).backward()
            if j >= real:
                continue
            for k in ("pg_loss", "entropy", "kl_ref", "distill_loss"):  # this rank's share x world: the ranks' mean is the union's
                if k in out:
                    sums[k] = sums.get(k, 0.0) + out[k] * (world * weight)
            keep = out["tail"]["loss_mask"] > 0
            flat["logp"].append(out["logp"][keep])
            for k in ("rollout_logp", "advantages"):
                flat[k].append(out["tail"][k][keep])
            flat["old_logp"].append(out["tail"].get("trainer_logp", out["tail"]["rollout_logp"])[keep])
        return sums | {k: torch.cat(v) for k, v in flat.items()}

    def global_norm(self, mask: torch.Tensor, *, counted: bool = True) -> tuple[float, int]:
        """`aggregation_norm` of the union of every rank's mini-batch: this rank's count (tokens, non-empty rows
        or rows, by `ppo.agg`; 0 when not `counted`) summed over ranks, the horizon (Dr.GRPO's T, the response
        window) the largest rank's; one all-reduce. One process: `aggregation_norm(mask)` itself."""
        count, horizon = aggregation_counts(mask, self.ppo.agg) if counted else (0, 0)
        table = ranks.gather([count, horizon])
        return float(max(int(table[:, 0].sum()), 1)), int(table[:, 1].max()) or int(mask.shape[-1])

    def _grad_sync(self, sync: bool):
        """DDP all-reduces gradients in every backward unless blocked: only the last micro-batch syncs (outside a
        Trainer: a policy wrapped in torch's DistributedDataParallel, blocked with its `no_sync`)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None) if self._trainer is not None else \
            getattr(self.policy, "no_sync", None)
        return contextlib.nullcontext() if sync or block is None else block()

    def _micro_batch_padding(self, count: int) -> int:
        """Under FSDP every forward gathers weights and every backward reduce-scatters gradients, so all ranks
        must run as many micro-batches (ranks differ in rows and in the token budget's split): a rank with
        fewer repeats its first micro-batch with weight 0 (verl balances its dynamic micro-batches across
        ranks likewise). Every micro-batch reduce-scatters (no gradient kept unsharded across micro-batches,
        which would cost a full-size gradient). 0 elsewhere: DDP syncs only the last micro-batch."""
        if not self.sharded or torch.distributed.get_world_size() < 2:  # sharded: the process group exists
            return 0
        most = torch.tensor(count, device=self.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)  # the ranks that shard (tp = 1)
        return int(most) - count

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        opt = self.optimizers()
        metrics = self.update(batch, opt)
        lr = opt.param_groups[0]["lr"]  # the rate this step's updates used
        self.lr_schedulers().step()
        tokens = batch.attention_mask.sum().item()
        seconds = time.perf_counter() - t0
        logged = {k: sum(v) / len(v) for k, v in metrics.items()}
        if self.device.type == "cuda":  # the update's peak (rollout and rescoring peaks are their own)
            logged[UPDATE_PEAK_GPU_GB] = torch.cuda.max_memory_allocated(self.device) / 2**30
        logged |= {"time/update_s": seconds, "perf/update_tokens_per_s": tokens / seconds,
                   "train_step": float(self.current_epoch + 1),  # training steps done (one per Lightning epoch)
                   "actor/lr": lr}
        self.log_dict(logged, on_step=True, prog_bar=False, sync_dist=True, batch_size=batch.num_rows)
        return None

    def update(self, batch: RolloutBatch, opt) -> dict[str, list[float]]:
        """One PPO update on a rollout batch: `ppo.epochs` passes of shuffled mini-batches, one optimizer step
        each (`opt`), with the on-policy log-prob check before the first step; returns the metrics' values per
        mini-batch. The gradients are freed at the end. Usable outside a Trainer (tests, benchmarks)."""
        ppo = self.ppo
        self.policy.train()
        metrics: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(int(self.global_step))
        chunks = self._num_mini_batches(batch.num_rows)
        if ppo.rollout_is_cap:  # TIS: the trainer's own pi_old over the whole batch, before any update
            batch = replace(batch, trainer_logp=self.trainer_logprobs(batch))
            self._check_logp_gap(batch.trainer_logp, batch.rollout_logp, batch.loss_mask, metrics)
            keep = batch.loss_mask > 0
            w = truncated_is_weights(batch.trainer_logp[keep], batch.rollout_logp[keep], ppo.rollout_is_cap)
            if w.numel():
                _add(metrics, "rollout/is_weight_mean", w.mean().item())
                _add(metrics, "rollout/is_truncated_fraction", (w >= ppo.rollout_is_cap).double().mean().item())
        for epoch in range(ppo.epochs):
            order = torch.randperm(batch.num_rows, generator=gen)
            for i, idx in enumerate(torch.tensor_split(order, chunks)):
                weight = 1.0 if len(idx) else 0.0  # an empty share still joins the ranks' all-reduce
                opt.zero_grad(set_to_none=True)
                out = self.accumulate(batch, idx if len(idx) else order[:1], weight=weight)
                logp, old, adv = out["logp"][None], out["old_logp"][None], out["advantages"][None]
                ones = torch.ones_like(logp)
                if epoch == 0 and i == 0 and not ppo.rollout_is_cap:  # no optimizer step yet: the policy is the rollout's
                    self._check_logp_gap(logp, out["rollout_logp"][None], ones * weight, metrics)
                for k in ("kl_ref", "distill_loss"):
                    if k in out:
                        _add(metrics, f"actor/{k}", out[k].item())
                if epoch == 0 and i == 0:
                    maybe_kill("update", self.current_epoch + 1)  # tests only (STEPOPSD_TEST_KILL_AT)
                grad_norm = self._clip_gradients()
                if not self._finite_update(out, grad_norm, metrics):
                    opt.zero_grad(set_to_none=True)  # skipped: the weights and AdamW's moments stay as they were
                    continue
                opt.step()
                stats = ppo_stats(logp, old, adv, ones, clip_low=ppo.clip_low, clip_high=ppo.clip_high)
                _add(metrics, "actor/pg_loss", out["pg_loss"].item())
                _add(metrics, "actor/entropy", out["entropy"].item())
                _add(metrics, "actor/grad_norm", grad_norm.item())
                for k in ("approx_kl", "clip_fraction", "ratio_mean"):
                    _add(metrics, f"actor/{k}", stats[k])
        opt.zero_grad(set_to_none=True)  # the last step's gradients are not kept through the next rollout
        return metrics

    def _finite_update(self, out: dict, grad_norm: torch.Tensor, metrics: dict) -> bool:
        """Whether an update's loss and gradient norm are finite. A non-finite one is skipped and counted
        (`actor/skipped_updates`); after `ppo.max_nonfinite_updates` skipped in a row the run stops with a
        `NonFiniteError` naming the last checkpoint (the weights are still the last good ones). Decided on every
        rank together: a non-finite value on any rank skips the update everywhere."""
        finite = bool(torch.isfinite(grad_norm)) and all(bool(torch.isfinite(out[k])) for k in ("pg_loss", "entropy"))
        finite = not ranks.any_rank(not finite)  # one rank's NaN skips the update on every rank (the same streak)
        _add(metrics, "actor/skipped_updates", float(not finite))
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        if self.nonfinite_streak >= self.ppo.max_nonfinite_updates:
            last = self.trainer.checkpoint_callback.last_model_path if self._trainer is not None and \
                self.trainer.checkpoint_callback is not None else ""
            raise NonFiniteError(f"{self.nonfinite_streak} PPO updates in a row had a non-finite loss or gradient "
                                 f"(training step {self.current_epoch + 1}); the weights were not changed by them. "
                                 f"Resume from the last checkpoint ({last or 'none saved yet'}) with a lower "
                                 "algorithm.ppo.lr, or check the advantages and rewards for inf/NaN")
        return finite

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm to max_grad_norm; returns the norm before clipping. Under FSDP the
        gradients are DTensor shards and `clip_grad_norm_` reduces their norms over all ranks (a replicated
        DTensor; tested against the unsharded norm of the same averaged gradient)."""
        model = self.trainer.model if self._trainer is not None else None
        if model is not None and hasattr(model, "clip_grad_norm_"):
            return model.clip_grad_norm_(self.ppo.max_grad_norm)
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.ppo.max_grad_norm)

    def _num_mini_batches(self, rows: int) -> int:
        """ceil(all ranks' rows / mini_batch_rows), the same on every rank: `mini_batch_rows` is the global
        mini-batch (verl's `ppo_mini_batch_size`), and each rank splits its own rows into that many near-equal
        parts, so optimizer step i trains on the union of every rank's part i (at most about mini_batch_rows
        rows) and every rank takes the same number of optimizer steps."""
        total = int(ranks.reduce([float(rows)])[0])
        return max(1, -(-total // self.ppo.mini_batch_rows))

    def on_train_end(self) -> None:
        """Under DDP, check that every rank ends with the same weights (a fingerprint per rank). Under FSDP each
        shard exists on one rank only: the fingerprint is of the gathered full weights (one tensor at a time)
        and of the frozen KL reference replica, i.e. what every rank generates and scores with."""
        if self.trainer.world_size < 2:
            return
        with torch.no_grad():  # per tensor: sum and sum of squares (no full-model copy, cheap at any size)
            if self.sharded:
                sums, squares = [], []
                frozen = list(self.reference.parameters()) if self.reference is not None else []
                for p in [*self.policy.parameters(), *frozen]:
                    full = (p.full_tensor() if hasattr(p, "full_tensor") else p).float()
                    sums.append(full.sum())
                    squares.append(full.square().sum())
                fingerprint = torch.stack(sums + squares)
            else:
                params = list(self.policy.parameters())
                fingerprint = torch.stack([p.float().sum() for p in params] + [p.float().square().sum() for p in params])
            spread = self.trainer.strategy.reduce(fingerprint, reduce_op="max") - (
                -self.trainer.strategy.reduce(-fingerprint, reduce_op="max"))
        diff = spread.abs().max().item()
        if self.trainer.is_global_zero:
            kind = "[fsdp] gathered weight" if self.sharded else "[ddp] weight"
            print(f"{kind} fingerprints across {self.trainer.world_size} ranks differ by at most {diff:.3g}")
        if diff > 1e-5 * max(1.0, fingerprint.abs().max().item()):
            raise RuntimeError(f"policy weights diverged across ranks (fingerprint spread {diff:.3g})")

    def _check_logp_gap(self, logp, rollout_logp, mask, metrics):
        """The policy has not been updated yet in this step: trainer and rollout log-probs must agree. Logs the
        mean and the largest per-token gap over every rank's tokens (`logp_gap`); a mean past
        `logp_gap_threshold` stops the run, on every rank in the same step."""
        gap, worst = logp_gap(logp, rollout_logp, mask)
        _add(metrics, LOGP_GAP_MEAN, gap)
        _add(metrics, LOGP_GAP_MAX, worst)
        if gap > self.ppo.logp_gap_threshold:
            raise LogpGapError(f"trainer and rollout log-probs differ by {gap:.4f} per token (threshold "
                               f"{self.ppo.logp_gap_threshold}): the rollout engine's weights were not synced after "
                               "the last update, or it samples at another temperature, or the tokenisation drifted; "
                               "raise ppo.logp_gap_threshold only if you know why")

    @torch.no_grad()
    def trainer_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """pi_old as the trainer computes it, [N, L] in `batch.rollout_logp`'s layout (0 off the loss mask), in
        the same micro-batches as the update (LM head on the response window only; under FSDP every rank runs
        as many forward passes)."""
        ppo = self.ppo
        out = torch.zeros_like(batch.rollout_logp)
        parts = micro_batches(torch.arange(batch.num_rows), batch.attention_mask.sum(1),
                              rows=ppo.micro_batch_rows or ppo.mini_batch_rows, tokens=ppo.micro_batch_tokens)
        real = len(parts)
        for j, micro in enumerate(parts + parts[:1] * self._micro_batch_padding(real)):
            rows = {k: v.to(self.device) for k, v in batch.rows(micro).items()}
            aligned = left_align(rows, rows["attention_mask"])
            keep = tail_width(aligned["loss_mask"])
            logp, _ = tail_logprobs(self.policy, aligned["input_ids"], aligned["attention_mask"], keep,
                                    temperature=ppo.temperature)
            if j >= real:
                continue
            full = torch.zeros_like(aligned["rollout_logp"])
            full[:, -keep:] = logp.to(full.dtype)
            back = right_align(full, rows["attention_mask"]) * rows["loss_mask"]
            out[micro, :back.shape[1]] = back.to(out.device, out.dtype)
        return out


class NonFiniteError(RunFailed, RuntimeError):
    """Too many PPO updates in a row with a non-finite loss or gradient: the run stops (one line)."""


class LogpGapError(UserError, RuntimeError):
    """The rollout engine's log-probs are not the trainer's (a stale engine, another temperature, drift): one line
    naming the likely causes, as a user error."""


def logp_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) [B, N] (`token_logprobs`) and the entropy [B, N] (`entropy_from_logits`, Eq. 14's c_ent
    term) of logits [B, N, V] at the sampling temperature, one row at a time under activation checkpointing:
    backward keeps only the model's own logits and recomputes one row's float32 copies (scaled logits,
    softmax) when it needs them, instead of holding several [B, N, V] float32 tensors per micro-batch."""
    def row(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (token_logprobs(z[None], t[None], temperature=temperature)[0],
                entropy_from_logits(z.float() / temperature))

    if not torch.is_grad_enabled():
        pairs = [row(z, t) for z, t in zip(logits, targets)]
    else:
        pairs = [torch.utils.checkpoint.checkpoint(row, z, t, use_reentrant=False) for z, t in zip(logits, targets)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def logp_gap(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of |trainer - rollout| log-prob over the tokens under `mask`, over the union of every rank's
    tokens (one all-reduce; one process: its own), so every rank sees the same gap and takes the same decision."""
    diff = (logp - rollout_logp).abs() * mask
    worst = diff.max().item() if diff.numel() else 0.0
    if ranks.world_size() < 2:
        return (diff.sum() / mask.sum().clamp(min=1)).item(), worst
    table = ranks.gather([diff.sum().item(), mask.sum().item(), worst])
    return float(table[:, 0].sum() / table[:, 1].sum().clamp(min=1)), float(table[:, 2].max())


def _add(metrics: dict, key: str, value: float) -> None:
    metrics.setdefault(key, []).append(value)
