"""The generation-backend registry (stepopsd/policy/backends/registry.py): `rollout.backend` picks a registered
factory built with the keyword arguments its options hook reads from the config; an unknown name is one line
listing the registered ones; vLLM is imported only when its backend is checked or built; `sleep` / `close` are part
of the `GenerationBackend` protocol (no-ops for HF), so the datamodule calls them without asking."""
import contextlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from stepopsd.errors import UserError
from stepopsd.policy.backends import HFBackend, registry
from stepopsd.policy.backends.registry import UnknownBackendError, backend_names, get_backend, register_backend


@pytest.fixture
def toy_registered(monkeypatch):
    """A toy backend registered as `toy` for one test (the registry is put back afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    built = []

    @register_backend("toy", options=lambda cfg: {"width": cfg.rollout.toy_width})
    class Toy:
        def __init__(self, model, tokenizer, *, width):
            self.model, self.tokenizer, self.width = model, tokenizer, width
            built.append(self)

    return Toy, built


def test_the_built_in_backends_are_registered():
    assert backend_names() == ["hf", "vllm"]
    assert get_backend("hf").factory is HFBackend
    assert get_backend("vllm").factory.__name__ == "VLLMBackend"


def test_an_unknown_backend_is_one_line_listing_the_registered_ones():
    with pytest.raises(UnknownBackendError) as e:
        get_backend("sglang")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rollout.backend=sglang") and "choose one of hf, vllm" in msg
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)  # check_config's ConfigError path


def test_a_registered_backend_is_built_with_its_options(toy_registered):
    toy, built = toy_registered
    from stepopsd.build import backend_factory

    assert "toy" in backend_names()
    cfg = OmegaConf.create({"seed": 0, "rollout": {"backend": "toy", "toy_width": 3}})
    backend = backend_factory(cfg)("model", "tok")
    assert isinstance(backend, toy) and (backend.model, backend.tokenizer, backend.width) == ("model", "tok", 3)
    assert built == [backend]


def test_a_name_cannot_be_taken_twice(toy_registered):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_backend("toy")(type("Other", (), {}))
    toy, _ = toy_registered
    assert register_backend("toy")(toy) is toy  # the same factory again (a re-imported module) is fine
    assert get_backend("toy").options is not None  # and keeps its options hook


def test_hf_is_built_with_the_configured_batch_size():
    from stepopsd.build import backend_factory

    cfg = OmegaConf.create({"seed": 0, "rollout": {"backend": "hf", "generate_batch_size": 7}})
    factory = backend_factory(cfg)
    assert factory.func is HFBackend and factory.keywords == {"batch_size": 7}
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    backend = factory(SimpleNamespace(generation_config=None), tok)
    assert backend.batch_size == 7
    assert backend.sleep() is None and backend.close() is None  # the protocol's no-ops


def test_vllm_is_imported_only_when_its_backend_is_checked_or_built():
    """Listing the backends (which imports stepopsd/policy/backends/vllm.py to register it) and importing the
    training entry point import nothing of vLLM itself."""
    code = ("import sys; from stepopsd.policy.backends import backend_names; assert 'vllm' in backend_names(); "
            "import stepopsd.train; assert 'vllm' not in sys.modules, 'vllm imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


class Recorder:
    def __init__(self):
        self.calls = []

    def sync_weights(self, model):
        self.calls.append("sync")

    def sleep(self):
        self.calls.append("sleep")

    def close(self):
        self.calls.append("close")


def test_the_datamodule_sleeps_the_backend_after_each_rollout_and_closes_it_at_teardown():
    from stepopsd.data.datamodule import RolloutDataModule

    backend = Recorder()
    dm = SimpleNamespace(backend=backend, policy="policy", full_weights=contextlib.nullcontext, env=None)
    with RolloutDataModule.generation(dm) as b:
        assert b is backend and backend.calls == ["sync"]
    assert backend.calls == ["sync", "sleep"]
    RolloutDataModule.teardown(dm, "fit")
    assert backend.calls == ["sync", "sleep", "close"] and dm.backend is None
    RolloutDataModule.teardown(dm, "fit")  # a second teardown (no backend left) does nothing
    assert backend.calls == ["sync", "sleep", "close"]
