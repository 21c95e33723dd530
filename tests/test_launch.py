"""Multi-process launches (stepopsd/launch.py, conf/trainer/{ddp,fsdp}.yaml): torchrun and `srun` ranks
agree on one run directory and let rank 0 prepare first; bad combinations are one-line errors; the real
train.py runs under torchrun as 2 "nodes" on loopback (gloo)."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from stepopsd.launch import trainer_kwargs
from stepopsd.config import ConfigError, check_config

from helpers.configs import heat_cpu_cfg
from helpers.runs import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "helpers", "launch_probe.py")
LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "RANK", "WORLD_SIZE",
              "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "STEPOPSD_RUN_STAMP")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    return env | {k: str(v) for k, v in extra.items()}


def run_ranks(commands, tmp, timeout=300):
    """Start one process per (argv, env); their output goes to files (pipes could fill while a rank waits)."""
    procs, logs = [], []
    try:
        for i, (argv, env) in enumerate(commands):
            out, err = open(tmp / f"rank{i}.out", "w+"), open(tmp / f"rank{i}.err", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, text=True))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def torchrun_node(rank: int, port: int, *argv):
    """One node of `torchrun --nnodes=2 --nproc_per_node=1` with static rendezvous on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
            "--master_addr=127.0.0.1", f"--master_port={port}", *argv]


def probe_lines(results):
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return sorted((json.loads(line) for _, out, _ in results for line in out.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])


def check_probes(lines, kind):
    assert [r["rank"] for r in lines] == [0, 1] and {r["kind"] for r in lines} == {kind}
    assert lines[0]["stamp"] == lines[1]["stamp"], "the ranks chose different run stamps"
    assert [r["subdir"] for r in lines] == [".hydra", None] and [r["suffix"] for r in lines] == ["", "_rank1"]
    assert all(r["seen"] for r in lines), "rank 1 went ahead before rank 0 had prepared"
    assert all(r["sum"] == 3.0 for r in lines)  # the process group works after (and alongside) the store


def test_torchrun_ranks_share_rank_zero_stamp_and_wait_for_its_data(tmp_path):
    """Static rendezvous: the agent of node 0 hosts the store at MASTER_ADDR:MASTER_PORT; every rank is a client."""
    port = free_port()
    results = run_ranks([(torchrun_node(r, port, PROBE, str(tmp_path)), clean_env()) for r in (0, 1)], tmp_path)
    check_probes(probe_lines(results), "torchrun")


def test_srun_ranks_share_rank_zero_stamp_and_wait_for_its_data(tmp_path):
    """`srun` (simulated by its variables): no agent, so rank 0 hosts the store on Lightning's SLURM address and
    port, and the process group later reuses that server (multi-tenant) instead of failing to bind it."""
    port = free_port()
    slurm = dict(SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1, SLURM_NNODES=2, SLURM_JOB_ID=4242, SLURM_STEP_ID=0,
                 SLURM_JOB_NAME="train", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    results = run_ranks([([sys.executable, PROBE, str(tmp_path)],
                          clean_env(**slurm, SLURM_PROCID=r, SLURM_LOCALID=0, SLURM_NODEID=r)) for r in (0, 1)], tmp_path)
    check_probes(probe_lines(results), "slurm")


def test_trainer_groups_compose():
    ddp = heat_cpu_cfg("trainer=ddp").trainer
    assert (ddp.strategy, ddp.accelerator, ddp.devices, ddp.num_nodes) == ("ddp", "cpu", 1, 1)  # machine=cpu: gloo
    strategy = trainer_kwargs(ddp)["strategy"]  # gradients as views into DDP's buckets: no second full-size copy
    assert type(strategy).__name__ == "DDPStrategy" and strategy._ddp_kwargs == {"gradient_as_bucket_view": True}
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(ROOT, "conf")):
        paper = compose("train", overrides=["experiment=alfworld_heat", "trainer=ddp", "trainer.num_nodes=4"]).trainer
    assert (paper.strategy, paper.accelerator, paper.num_nodes) == ("ddp", "gpu", 4)
    fsdp = heat_cpu_cfg("trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2").trainer
    kwargs = trainer_kwargs(fsdp)
    assert type(kwargs["strategy"]).__name__ == "ModelParallelStrategy" and "fsdp" not in kwargs
    assert (kwargs["strategy"]._data_parallel_size, kwargs["strategy"]._tensor_parallel_size) == (8, 1)  # every process
    assert set(fsdp.fsdp) == {"layer_class", "reshard_after_forward", "param_dtype", "reduce_dtype"}
    check_config(heat_cpu_cfg("trainer=fsdp", "trainer.devices=2"))  # CPU processes (gloo): accepted


@pytest.mark.parametrize("overrides, env, words", [
    (["trainer=ddp", "trainer.strategy=fsdp"], {}, "use trainer=fsdp"),  # Lightning's FSDPStrategy (FSDP1)
    (["trainer=fsdp", "trainer.devices=auto"], {}, "trainer.devices=auto"),
    (["trainer=fsdp", "trainer.fsdp.param_dtype=float16"], {}, "param_dtype=float16"),
    (["trainer=ddp", f"ckpt_path={ROOT}"], {}, "resume it with trainer=fsdp"),  # a folder: a sharded checkpoint
    (["trainer=ddp", "trainer.num_nodes=2"], {}, "torchrun or SLURM"),
    (["trainer=ddp", "trainer.devices=1"], dict(TORCHELASTIC_RUN_ID="x", RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                                MASTER_PORT=1), "torchrun started 2"),
    (["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"],
     dict(SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=2, SLURM_PROCID=0, SLURM_JOB_NAME="train", MASTER_ADDR="127.0.0.1",
          MASTER_PORT=1), "slurm started 2"),
])
def test_bad_launch_combinations_are_one_line_config_errors(overrides, env, words, monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    with pytest.raises(ConfigError, match=words) as e:
        check_config(heat_cpu_cfg(*overrides))
    assert "\n" not in str(e.value)


def test_a_sweep_with_ddp_inside_a_trial_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=alfworld_heat", "machine=cpu", "trainer=ddp",
                           "trainer.devices=2", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Hydra sweep" in proc.stderr


@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


def test_torchrun_two_nodes_train_one_run_dir_summed_episodes_identical_weights(games, tmp_path_factory):
    """The real train.py under `torchrun --nnodes=2 --nproc_per_node=1` (2 "nodes" on loopback, gloo): one run
    directory (rank 0's stamp, to the microsecond), rank 0 alone writes its config copy and the policy, each
    rank rolls out its own whole group (episodes summed over the nodes) and all ranks end with the same weights."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # shared with test_train_e2e: rank 0 builds it if missing
    runs, logs = tmp_path_factory.mktemp("torchrun-runs"), tmp_path_factory.mktemp("torchrun-logs")
    overrides = [o for o in tiny_overrides(games, cache, "X") if not o.startswith("hydra.run.dir")]
    argv = ["train.py", "experiment=alfworld_heat", "machine=cpu", "algorithm=stepopsd", *overrides,
            "hydra.run.dir=" + str(runs / "${stepopsd.run_stamp:%Y-%m-%d_%H-%M-%S-%f}"),
            "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "env.num_workers=1"]
    port = free_port()
    (node0, node1) = run_ranks([(torchrun_node(r, port, *argv), clean_env()) for r in (0, 1)], logs, timeout=600)
    assert node0[0] == 0 and node1[0] == 0, (node0[2] + node1[2])[-4000:]
    (run,) = os.listdir(runs)  # one run directory for both ranks
    files = set(os.listdir(runs / run))
    assert {".hydra", "train.log", "train_rank1.log", "policy", "csv"} <= files, files
    assert "[ddp] weight fingerprints across 2 ranks differ by at most 0" in node0[1]
    rows = list(csv.DictReader(open(runs / run / "csv" / "version_0" / "metrics.csv")))
    steps = [r for r in rows if r.get("actor/pg_loss")]
    assert len(steps) == 2
    # tasks_per_step=1 x group_size=2 on each of the 2 nodes: 4 episodes a step, summed over the nodes
    assert all(float(r["rollout/episodes"]) == 4.0 for r in steps)
