"""The memory model of one colocated training step (stepopsd/memory.py): every phase against numbers worked out by
hand, the fits/does-not-fit decision, and its inputs read from a composed config (the Qwen3-1.7B `model.init=random`
architecture on a fake 80 GB and 141 GB card)."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from stepopsd import memory
from stepopsd.errors import UserError
from stepopsd.memory import GIB, StepMemory, fit_check, memory_decision, predict, step_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 1e9 parameters, 10 layers of hidden 1000 and MLP 3000, vocabulary 1000, 2 rows x (90 + 10) tokens per micro-batch
BASE = dict(params=10**9, hidden=1000, layers=10, vocab=1000, intermediate=3000, kv_dim=100, micro_batch_rows=2,
            prompt_tokens=90, response_tokens=10, teacher_rows=1, teacher_extra_tokens=0, generate_rows=4,
            card_gib=100.0)
B = memory.B_LOGITS
# by hand: fp32 weights 4e9, AdamW 8e9, grads 4e9, bf16 reference + teacher 2 x 2e9, autocast cache 2e9
PERSISTENT = 4e9 + 8e9 + 4e9  # weights + AdamW + frozen copies (grads freed outside the update)
ACT_CKPT = (4 + (24 * 1000 + 8 * 3000) / 1000 / 10) * 2 * 100 * 1000 * 10 + B * 2 * 10 * 1000  # a = 8.8
ACT_FULL = (24 * 1000 + 8 * 3000) / 1000 * 2 * 100 * 1000 * 10 + B * 2 * 10 * 1000  # a = 48
TEACHER = 1 * 100 * (8 * 1000 + 6 * 3000) + 1 * 10 * 1000 * 2 + 3 * 4 * 10 * 1000  # one layer, bf16 logits, one row fp32


def gib(x: float) -> float:
    return x / GIB


def test_vllm_awake_all_step():
    p = predict(StepMemory(**BASE, engine="vllm", gpu_memory_utilization=0.5, sleep_level=0))
    engine = 50 * GIB  # 0.5 x 100 GiB, held in every phase at sleep level 0
    assert p.rollout_gib == pytest.approx(gib(PERSISTENT + engine))
    assert p.teacher_gib == pytest.approx(gib(PERSISTENT + engine + TEACHER))
    assert p.update_gib == pytest.approx(gib(PERSISTENT + 4e9 + engine + 2e9 + ACT_CKPT))
    assert p.peak_phase == "update" and p.peak_gib == p.update_gib


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_asleep_during_teacher_and_update(level):
    p = predict(StepMemory(**BASE, engine="vllm", gpu_memory_utilization=0.5, sleep_level=level))
    asleep = memory.VLLM_ASLEEP_GIB * GIB
    assert p.rollout_gib == pytest.approx(gib(PERSISTENT + 50 * GIB))  # awake for the rollout
    assert p.teacher_gib == pytest.approx(gib(PERSISTENT + asleep + TEACHER))
    assert p.update_gib == pytest.approx(gib(PERSISTENT + 4e9 + asleep + 2e9 + ACT_CKPT))
    assert p.peak_phase == "rollout"


def test_hf_rollout_and_no_checkpointing():
    p = predict(StepMemory(**BASE, engine="hf", gradient_checkpointing=False))
    kv = 4 * 100 * 10 * 2 * 100 * 2  # rows x tokens x layers x (k, v) x kv_dim x bf16
    prefill = 4 * 90 * (8 * 1000 + 6 * 3000)
    assert p.rollout_gib == pytest.approx(gib(PERSISTENT + kv + prefill + 2e9))  # + autocast cache
    assert p.update_gib == pytest.approx(gib(PERSISTENT + 4e9 + 2e9 + ACT_FULL))


def test_fsdp_shards_trainable_state_not_frozen_copies():
    p = predict(StepMemory(**BASE, world=4, engine="vllm", gpu_memory_utilization=0.5, sleep_level=2))
    persistent = 1e9 + 2e9 + 4e9  # weights and AdamW / 4, whole bf16 replicas
    assert p.rollout_gib == pytest.approx(gib(persistent + 50 * GIB + 2e9))  # + the gathered bf16 policy
    cache = 2 * 1e9 / 10 * 2  # two gathered bf16 layers instead of the autocast cache
    assert p.update_gib == pytest.approx(gib(persistent + 1e9 + GIB + cache + ACT_CKPT))


def test_grpo_without_teacher_and_grads_kept():
    p = predict(StepMemory(**(BASE | {"teacher_rows": 0}), teacher=False, grads_kept=True, engine="vllm",
                           gpu_memory_utilization=0.5))
    persistent = 4e9 + 8e9 + 2e9 + 4e9  # reference only, gradients alive through the rollout
    assert p.teacher_gib == 0
    assert p.rollout_gib == pytest.approx(gib(persistent + 50 * GIB))
    assert p.update_gib == pytest.approx(gib(persistent + 50 * GIB + 2e9 + ACT_CKPT))
    assert p.parts["frozen"] == pytest.approx(gib(2e9))


def test_explicit_coefficients():
    p = predict(StepMemory(**BASE, a=1.0, b=2.0))
    act = 1.0 * 2 * 100 * 1000 * 10 + 2.0 * 2 * 10 * 1000
    assert p.update_gib == pytest.approx(gib(PERSISTENT + 4e9 + 2e9 + act))


@pytest.mark.parametrize("predicted, free, status", [(60, 80, "ok"), (70, 80, "warn"), (100, 80, "warn"),
                                                      (110, 80, "stop")])
def test_fit_check(predicted, free, status):
    got, line = fit_check(predicted, free, 0.25)  # stop past 80 / 0.75 = 106.7, warn past 80 / 1.25 = 64
    assert got == status
    assert "\n" not in line and f"{predicted:.1f} GiB" in line
    if status != "ok":
        for knob in memory.KNOBS:
            assert knob in line


def cfg_of(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(ROOT, "conf")):
        return compose("train", overrides=["experiment=alfworld_heat", "model.init=random", *overrides])


def meta_policy(cfg):
    """The configured architecture without memory (meta tensors): its parameter count and config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = OmegaConf.to_container(cfg.model.arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_inputs_from_the_config():
    cfg = cfg_of("rollout.backend=vllm", "rollout.vllm.sleep_level=1", "algorithm.ppo.micro_batch_rows=4")
    s = step_memory(cfg, meta_policy(cfg), 140.0)
    assert (s.params, s.hidden, s.layers, s.vocab, s.intermediate, s.kv_dim) == (1_720_574_976, 2048, 28, 151936,
                                                                               6144, 8 * 128)
    assert (s.micro_batch_rows, s.prompt_tokens, s.response_tokens) == (4, 2048, 512)
    assert s.gradient_checkpointing and s.reference and s.teacher and s.world == 1
    assert (s.teacher_rows, s.teacher_extra_tokens) == (8, 512)
    assert (s.engine, s.gpu_memory_utilization, s.sleep_level, s.card_gib) == ("vllm", 0.5, 1, 140.0)
    grpo = step_memory(cfg_of("algorithm=grpo", "algorithm.ppo.micro_batch_tokens=5120"), meta_policy(cfg), 80.0)
    assert not grpo.teacher and grpo.engine == "hf" and grpo.micro_batch_rows == 2  # 5120 tokens / 2560 a row


def test_decision_on_80_and_141_gb_cards():
    """Qwen3-1.7B at the paper shapes with vLLM at 0.5 awake all step: over an 80 GB card's free memory (by less
    than the model's error: a warning), inside a 141 GB one only with the engine asleep during the update."""
    cfg = cfg_of("rollout.backend=vllm")
    policy = meta_policy(cfg)
    h100, h200 = 81_559 / 1024, 143_771 / 1024  # total GiB
    status, line, pred = memory_decision(cfg, policy, h100 - 0.5, h100)
    assert status == "warn" and pred.peak_phase == "update" and "\n" not in line
    assert memory_decision(cfg, policy, h200 - 0.5, h200)[0] == "warn"
    asleep = cfg_of("rollout.backend=vllm", "rollout.vllm.sleep_level=2")
    assert memory_decision(asleep, policy, h200 - 0.5, h200)[0] == "ok"
    # a card mostly taken by another process: the same step stops, naming the knobs
    status, line, _ = memory_decision(cfg, policy, 20.0, h200)
    assert status == "stop" and all(k in line for k in memory.KNOBS)


def test_check_skipped_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.check_memory(cfg_of(), None, object()) is None


def test_check_stops_with_one_line_on_a_full_card(monkeypatch):
    """The CUDA path with the card faked: a stop is a one-line user error (train.py prints it, exit 2); =warn only
    warns."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    cfg = cfg_of("rollout.backend=vllm")
    trainer = type("T", (), {"accelerator": CUDAAccelerator(),
                             "strategy": type("S", (), {"root_device": torch.device("cuda", 0)})()})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * GIB, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "fake card")

    with pytest.raises(memory.MemoryFitError, match="fake card: predicted peak GPU memory") as e:
        memory.check_memory(cfg, meta_policy(cfg), trainer)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    monkeypatch.setenv(memory.CHECK_VAR, "warn")
    assert memory.check_memory(cfg, meta_policy(cfg), trainer) == "stop"


def test_predict_table(capsys):
    """train_step_memory.py --predict: one row per (micro, engine, card) with every phase and the check's verdict."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "experiments", "benchmarks"))
    import train_step_memory

    train_step_memory.predict_table(["qwen3_1.7b"], [8])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| qwen3_1.7b | 8 |")]
    assert len(rows) == 4 * 2  # HF + vLLM sleep 0/1/2, on 80 and 141 GB
    sleep0_141 = next(r for r in rows if "sleep 0" in r and "141 GB" in r).split(" | ")
    assert sleep0_141[-1].rstrip(" |") in ("ok", "warn", "stop") and "(update)" in sleep0_141[-2]
