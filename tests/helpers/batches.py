"""Hand-made `RolloutBatch`es, without a rollout: random token rows (`synthetic_batch`) and a small batch of given
rewards and groups (`batch_of`); `with_advantages` fills a built batch's advantages with a registered estimator, as
the training step's advantage stage does."""
import torch

from stepopsd.data.batch import RolloutBatch


def synthetic_batch(vocab: int, lengths: list[tuple[int, int]], seed: int = 0) -> RolloutBatch:
    """Rows of (prompt, response) lengths, right-padded; rollout log-probs near a plausible value and
    advantages of both signs, so that the clip and all loss terms are active."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(p + r for p, r in lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    attention, loss_mask = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width)
    for i, (p, r) in enumerate(lengths):
        ids[i, :p + r] = torch.randint(5, vocab, (p + r,), generator=g)
        attention[i, :p + r] = 1
        loss_mask[i, p:p + r] = 1
    rollout_logp = (-torch.rand(n, width, generator=g) * 8 - 4) * loss_mask
    adv = torch.randn(n, 1, generator=g) * loss_mask
    z = torch.zeros(n, dtype=torch.long)
    return RolloutBatch(ids, attention, loss_mask, rollout_logp, adv, torch.full((n, width), -1), torch.arange(n), z,
                        torch.tensor([p for p, _ in lengths]), z, z.float(), z.bool(), z.float(), ())


def batch_of(rewards, groups, rows_per_traj=(2, 1, 1, 3)) -> RolloutBatch:
    """Trajectory m has rows_per_traj[m] rows of 4 tokens, the last 2 of each on the loss mask."""
    row_traj = torch.tensor([m for m, n in enumerate(rows_per_traj) for _ in range(n)])
    n, width = len(row_traj), 4
    loss_mask = torch.zeros(n, width)
    loss_mask[:, 2:] = 1
    z = torch.zeros(n, width)
    return RolloutBatch(torch.ones(n, width, dtype=torch.long), torch.ones(n, width, dtype=torch.long), loss_mask, z, z.clone(),
                        torch.full((n, width), -1), row_traj, torch.zeros(n, dtype=torch.long),
                        torch.full((n,), 2), torch.tensor(groups), torch.tensor(rewards, dtype=torch.float32),
                        torch.tensor([r > 0 for r in rewards]), torch.zeros(len(rewards)), ())


def with_advantages(batch: RolloutBatch, name: str = "grpo") -> RolloutBatch:
    """`batch` (from `build_batch`, advantages zero) with the `name` estimator's advantages written in, as
    `AdvantageStage` writes them before the update."""
    from stepopsd.estimators import Context, build_estimator

    out = build_estimator({"name": name}).advantages(batch, Context(step=0))
    batch.advantages = out.tokens
    if out.trajectories is not None:
        batch.traj_adv = out.trajectories
    return batch
