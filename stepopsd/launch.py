"""Multi-process launches (torchrun, SLURM `srun`): one run directory, rank 0 prepares first.

Under torchrun or `srun` every rank runs `train.py` itself, so everything a single process decides
on its own must be agreed on instead:

- **The run directory.** `conf/hydra/default.yaml` names it `outputs/<task>/runs/${stepopsd.run_stamp:...}`.
  Outside a launch the stamp is the current time (as Hydra's `${now:...}`); inside one, global rank 0
  publishes its stamp and the other ranks read it, before Hydra creates any folder.
  `$STEPOPSD_RUN_STAMP`, when set, is used as is by every rank (no communication).
- **Who writes.** Only rank 0 keeps Hydra's `.hydra/` copy of the config (`${stepopsd.rank_zero_only:.hydra}`);
  the other ranks log to `<job>_rank<R>.log` (`${stepopsd.rank_suffix:}`), not to rank 0's file.
- **Data preparation.** `rank_zero_first`: rank 0 generates the data and builds the policy cache while
  the others wait, then they load what it wrote. For several nodes, `data/` and the cache folder must be
  on a filesystem all nodes share (or be prepared on each node beforehand).

The messages go through the c10d TCP store at MASTER_ADDR:MASTER_PORT, under a key prefix of this
launch. Under torchrun the elastic agent of node 0 already hosts that store before the workers start
(`TORCHELASTIC_USE_AGENT_STORE=True`, static and c10d rendezvous alike): every rank is a client. Without
an agent store (`srun`, or torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0 hosts it as a
multi-tenant server, exactly as `torch.distributed.init_process_group` would, and the process group
later reuses that server. Under `srun` the address and port are Lightning's own choice for SLURM.

Lightning's own launcher (`trainer.strategy=ddp trainer.devices=N` without torchrun) needs none of
this: rank 0 prepares everything before it starts the other processes and passes them its run
directory (`hydra.run.dir=...`), so there `launch()` is None and every function here is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

from omegaconf import OmegaConf

from stepopsd.errors import UserError

TIMEOUT_S = float(os.environ.get("STEPOPSD_RANK0_TIMEOUT", 7200))  # how long a rank waits for rank 0


class LaunchError(UserError, RuntimeError):
    """Rank 0 failed (or never answered) while the other ranks waited for it: one line pointing at rank 0's log."""


@dataclass(frozen=True)
class Launch:
    """The multi-process launch this process belongs to."""

    kind: str          # "torchrun" | "slurm"
    rank: int          # global rank
    world_size: int
    addr: str          # where the c10d store is (MASTER_ADDR:MASTER_PORT)
    port: int
    agent_store: bool  # the torchrun agent hosts the store (every rank is a client)
    prefix: str        # key prefix of this launch in the store

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def launch() -> Launch | None:
    """The torchrun / `srun` launch of this process, or None (a single process or Lightning's own launcher).

    Detected as Lightning detects them (torchrun first, as it can run inside SLURM)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") is not None and "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        return Launch("torchrun", int(env["RANK"]), world, env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                      agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                      prefix=f"stepopsd/{env['TORCHELASTIC_RUN_ID']}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world = int(env["SLURM_NTASKS"])
        if world <= 1:
            return None
        from lightning.fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()  # the address and port Lightning will use for the process group
        return Launch("slurm", int(env["SLURM_PROCID"]), world, slurm.main_address, slurm.main_port, agent_store=False,
                      prefix=f"stepopsd/{env.get('SLURM_JOB_ID', 'job')}.{env.get('SLURM_STEP_ID', '0')}/")
    return None


_store = None  # kept for the whole process: without an agent, rank 0's server is the process group's too


def store(info: Launch):
    """This launch's c10d TCP store (a client; rank 0 hosts it when no agent does)."""
    global _store
    if _store is None:
        from torch.distributed import TCPStore

        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if info.agent_store:
            _store = TCPStore(info.addr, info.port, is_master=False, timeout=timeout, wait_for_workers=False)
        else:
            _store = TCPStore(info.addr, info.port, info.world_size, is_master=info.is_zero, timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
    return _store


def agree(name: str, value: str) -> str:
    """Rank 0's `value` for `name`, on every rank of the launch (this process's own value outside one)."""
    info = launch()
    if info is None:
        return value
    s, key = store(info), info.prefix + name
    if info.is_zero:
        s.set(key, value)
        return value
    try:
        return s.get(key).decode()
    except RuntimeError as e:  # timeout or rank 0 gone
        raise LaunchError(f"rank {info.rank}: no answer from rank 0 for {name!r} at {info.addr}:{info.port}: {e}") from e


_stamps: dict[str, str] = {}


def run_stamp(pattern: str) -> str:
    """`${stepopsd.run_stamp:%Y-%m-%d_%H-%M-%S}`: the run's time stamp, the same on every rank of a launch."""
    if pattern not in _stamps:
        _stamps[pattern] = os.environ.get("STEPOPSD_RUN_STAMP") or agree(
            f"run_stamp/{pattern}", datetime.datetime.now().strftime(pattern))
    return _stamps[pattern]


def run_dir(parent: str, resume=None, overrides=()) -> str:
    """`${stepopsd.run_dir:outputs/<task>/runs,${resume},${hydra:overrides.task}}`: the folder of this run,
    the same on every rank of a launch.

    - `resume` null: a new folder `<parent>/<time stamp>`; one that already holds something (two runs
      started in the same second) gets a suffix (`_1`, `_2`, ...), so an earlier run is never overwritten.
    - `resume=auto`: the newest folder under `parent` started with the same overrides (`resume` aside) that
      holds a readable checkpoint: the killed or pre-empted run continues in its own folder. None: a new one.
    - `resume=<run dir>`: that folder.
    """
    def decide() -> str:
        if resume not in (None, "", "auto"):
            return str(resume)
        if resume == "auto":
            if (found := resumable_run(parent, overrides)) is not None:
                return found
        base = os.path.join(parent, run_stamp("%Y-%m-%d_%H-%M-%S"))
        path, n = base, 0
        while os.path.exists(path) and os.listdir(path):
            n += 1
            path = f"{base}_{n}"
        return path

    key = f"run_dir/{parent}/{resume}/{same_run_key(overrides)}"
    if key not in _stamps:  # decided once per process (Hydra resolves the run dir more than once)
        _stamps[key] = agree("run_dir", decide() if _is_zero() else "")
    return _stamps[key]


def _is_zero() -> bool:
    info = launch()
    return info is None or info.is_zero


def same_run_key(overrides) -> str:
    """An override list as a run's identity: sorted, `resume=` left out."""
    return "|".join(sorted(str(o) for o in overrides or () if not str(o).startswith("resume=")))


def resumable_run(parent: str, overrides) -> str | None:
    """The newest run folder under `parent` with these overrides and a readable checkpoint (resume=auto)."""
    import yaml

    from stepopsd.checkpoints import last_good_checkpoint

    if not os.path.isdir(parent):
        return None
    for name in sorted(os.listdir(parent), reverse=True):
        folder = os.path.join(parent, name)
        try:
            with open(os.path.join(folder, ".hydra", "overrides.yaml")) as f:
                saved = yaml.safe_load(f) or []
        except (OSError, yaml.YAMLError):
            continue
        if same_run_key(overrides) == same_run_key(saved) and last_good_checkpoint(folder) is not None:
            return folder
    return None


def rank_zero_only(value):
    """`${stepopsd.rank_zero_only:X}`: X on global rank 0 (and outside a launch), None on the other ranks."""
    info = launch()
    return value if info is None or info.is_zero else None


def rank_suffix() -> str:
    """`${stepopsd.rank_suffix:}`: "" on global rank 0 (and outside a launch), "_rank<R>" on the others."""
    info = launch()
    return "" if info is None or info.is_zero else f"_rank{info.rank}"


OmegaConf.register_new_resolver("stepopsd.run_stamp", run_stamp, replace=True)
OmegaConf.register_new_resolver("stepopsd.run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("stepopsd.rank_zero_only", rank_zero_only, replace=True)
OmegaConf.register_new_resolver("stepopsd.rank_suffix", rank_suffix, replace=True)


@contextlib.contextmanager
def rank_zero_first(what: str):
    """Global rank 0 runs the block first; the other ranks wait for it, then run it (finding its files)."""
    info = launch()
    if info is None:
        yield
        return
    s, key = store(info), info.prefix + "ready/" + what
    if info.is_zero:
        try:
            yield
        except BaseException:
            s.set(key, "failed")
            raise
        s.set(key, "ok")
        return
    print(f"[launch] rank {info.rank} waits for rank 0 to prepare {what}", flush=True)
    try:
        s.wait([key])
        status = s.get(key).decode()
    except RuntimeError as e:
        raise LaunchError(f"rank {info.rank}: rank 0 did not finish preparing {what} within {TIMEOUT_S:.0f}s: {e}") from e
    if status != "ok":
        raise LaunchError(f"rank {info.rank}: rank 0 failed while preparing {what} (see its log)")
    yield


def trainer_kwargs(trainer_cfg) -> dict:
    """`L.Trainer` keyword arguments from the `trainer` group: a strategy given as a node with `_target_`
    (conf/trainer/fsdp.yaml) is instantiated (its `data_parallel_size: null` becomes devices x num_nodes);
    the group's `fsdp` node holds model-side settings for `GRPOModule.configure_model` (ShardingConfig), not
    for the Trainer, and is left out. `strategy: ddp` becomes a DDPStrategy with `gradient_as_bucket_view=True`:
    the gradients are views into DDP's all-reduce buckets instead of a second full-size copy of them."""
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs.pop("fsdp", None)
    if kwargs.get("strategy") == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        kwargs["strategy"] = DDPStrategy(gradient_as_bucket_view=True)
    elif isinstance(kwargs.get("strategy"), dict):
        from hydra.utils import instantiate

        extra = {}
        if sharded(trainer_cfg) and kwargs["strategy"].get("data_parallel_size") is None:
            extra["data_parallel_size"] = trainer_cfg.devices * trainer_cfg.num_nodes  # every process one shard
        kwargs["strategy"] = instantiate(trainer_cfg.strategy, **extra)
    return kwargs


def sharded(trainer_cfg) -> bool:
    """trainer=fsdp: Lightning's ModelParallelStrategy, the policy sharded with FSDP2 by GRPOModule.configure_model."""
    strategy = trainer_cfg.get("strategy")
    return not isinstance(strategy, str) and strategy is not None and \
        str(strategy.get("_target_", "")).endswith("ModelParallelStrategy")


def world_size_mismatch(devices, num_nodes) -> str | None:
    """Under torchrun / `srun`: a one-line message when trainer.devices x trainer.num_nodes is not the launch's
    number of processes (Lightning would only find out after the data and the policy are built)."""
    info = launch()
    if info is None or not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return None
    if devices * num_nodes != info.world_size:
        return (f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {devices * num_nodes} processes, but "
                f"{info.kind} started {info.world_size}: set trainer.devices to the processes per node and "
                f"trainer.num_nodes to the nodes")
    return None
