"""The rank variables a vLLM engine needs under every launcher (issue 19, item 2), without vLLM.

vLLM 0.32's external launcher reads RANK and LOCAL_RANK from the environment (vllm/v1/executor/uniproc_executor.py,
`ExecutorWithExternalLauncher._distributed_args`). torchrun sets every rank variable; Lightning's own launcher
(`trainer=ddp trainer.devices=2`, lightning/pytorch/strategies/launchers/subprocess_script.py) sets LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT and NODE_RANK but not RANK; a bare `srun` sets only SLURM_* (Lightning's
`_init_dist_connection` adds MASTER_*). `engine_rank_env` says what to add; `prepare_engine_env` reads the values
from the initialised process group (checked here on a real 2-process gloo group).
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from stepopsd.errors import UserError
from stepopsd.policy.backends.vllm import (RankEnvError, engine_rank_env, engine_tensors, local_rank_from_hosts,
                                           prepare_engine_env)

from helpers.dist import free_port

TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
LIGHTNING = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # MASTER_*: set by Lightning when it joins the group


def test_torchrun_sets_everything_already():
    assert engine_rank_env(1, 2, 1, TORCHRUN, master_addr="127.0.0.1", master_port=29500) == {}


def test_lightning_launcher_lacks_only_rank():
    assert engine_rank_env(1, 2, 1, LIGHTNING, master_addr="127.0.0.1", master_port=29500) == {"RANK": "1"}


def test_srun_lacks_rank_local_rank_and_world_size():
    assert engine_rank_env(1, 2, 1, SRUN) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    # with no MASTER_* at all (a group initialised from a tcp:// URL), the group's store address is filled in
    assert engine_rank_env(0, 2, 0, {}, master_addr="10.0.0.5", master_port=1234) == {
        "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"}


@pytest.mark.parametrize("name, value", [("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0"), ("RANK", "one")])
def test_a_variable_that_disagrees_with_the_group_is_a_one_line_error(name, value):
    with pytest.raises(RankEnvError) as err:
        engine_rank_env(1, 2, 1, TORCHRUN | {name: value})
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert f"{name}={value}" in str(err.value) and "process group" in str(err.value)


def test_master_address_is_filled_in_never_overwritten():
    env = LIGHTNING | {"MASTER_ADDR": "node-0"}  # a host name where the store reports an address: left alone
    assert engine_rank_env(1, 2, 1, env, master_addr="10.0.0.5", master_port=1) == {"RANK": "1"}


def test_impossible_ranks_are_refused():
    with pytest.raises(ValueError):
        engine_rank_env(2, 2, 0, {})
    with pytest.raises(ValueError):
        engine_rank_env(0, 2, -1, {})


def test_local_rank_from_host_names():
    hosts = ["a", "a", "b", "b", "a"]
    assert [local_rank_from_hosts(r, hosts) for r in range(5)] == [0, 1, 0, 1, 2]


def test_outside_a_process_group_nothing_is_set():
    env = {}
    assert prepare_engine_env(env) == {} and env == {}


def test_weights_are_streamed_one_tensor_at_a_time_in_the_engine_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    stream = engine_tensors(model, torch.bfloat16)
    assert not isinstance(stream, (list, tuple))  # a generator: nothing is gathered or cast before it is asked for
    name, first = next(stream)
    assert name == "0.weight" and first.dtype == torch.bfloat16
    rest = list(stream)
    assert [n for n, _ in rest] == ["0.bias", "1.weight", "1.bias"]
    assert torch.equal(rest[1][1], model[1].weight.detach().to(torch.bfloat16))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        other = 1 - rank
        cases = {  # each launcher's environment as this rank would see it (a dict: os.environ stays as it is)
            "torchrun": {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)},
            "lightning": {"LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(port)},
            "srun": {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            "bare": {},  # no launcher variables at all: the local rank from the ranks' host names (a collective)
        }
        result = {}
        for name, env in cases.items():
            added = prepare_engine_env(env)
            result[name] = {"added": added, "env": env}
        try:
            prepare_engine_env({"RANK": str(other), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
            result["swapped"] = "accepted"
        except RankEnvError as e:
            result["swapped"] = str(e)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_each_rank_of_a_real_gloo_group_computes_its_own_variables(tmp_path):
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = json.load(open(tmp_path / f"rank{rank}.json"))
        assert r["torchrun"]["added"] == {}
        assert r["lightning"]["added"] == {"RANK": str(rank)}
        assert r["srun"]["added"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        assert r["bare"]["added"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # from the group's store
        for case in ("lightning", "srun", "bare"):  # what vLLM then reads
            env = r[case]["env"]
            assert (int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])) == (rank, rank, 2)
        assert f"RANK={1 - rank}" in r["swapped"] and "\n" not in r["swapped"]


def test_rollout_is_cap_left_null_is_off_under_hf():
    """`algorithm.ppo.rollout_is_cap` null (the default) is 0 under rollout.backend=hf and stays settable; the
    vLLM half (null -> 2.0, an explicit 0 kept) is in tests/test_vllm.py, where vLLM imports."""
    from helpers.configs import heat_cpu_cfg
    from stepopsd.config import check_config

    assert heat_cpu_cfg().algorithm.ppo.rollout_is_cap is None
    assert check_config(heat_cpu_cfg())[0].rollout_is_cap == 0.0
    assert check_config(heat_cpu_cfg("algorithm.ppo.rollout_is_cap=3.0"))[0].rollout_is_cap == 3.0


class _RecordingEngine:
    """Stands in for `vllm.LLM`: records the calls the backend makes (sleep mode needs a GPU build of vLLM)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs):
        names = [name for name, _ in kwargs["weights_iterator"]]  # consumed here, as the worker's reload does
        self.calls.append((method, len(names)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def test_a_sleeping_engine_wakes_its_weights_then_takes_the_push_then_its_kv_cache():
    from stepopsd.policy.backends.vllm import VLLMBackend, VLLMConfig

    backend = object.__new__(VLLMBackend)  # no engine build: the wake / push order only
    backend.config, backend.dtype, backend.asleep, backend.pushes = VLLMConfig(sleep_level=2), torch.bfloat16, False, 1
    backend.llm = _RecordingEngine()
    model = torch.nn.Linear(2, 2)
    backend.sleep()
    backend.sync_weights(model)
    assert backend.llm.calls == [("sleep", 2), ("wake_up", ["weights"]), ("reload_weights", 2), ("wake_up", ["kv_cache"]),
                                 ("reset_prefix_cache",)]
    assert not backend.asleep and backend.pushes == 2
    backend.llm.calls.clear()
    backend.sync_weights(model)  # awake: no wake-up calls
    assert backend.llm.calls == [("reload_weights", 2), ("reset_prefix_cache",)]
