"""Generation backends: the interface (`base`), the registry `rollout.backend` picks from (`registry`), the
`transformers` implementation (`hf`) and vLLM (`vllm`: the module registers itself without importing vLLM, an
optional dependency imported only when that backend is checked or built)."""
from stepopsd.policy.backends.base import Generation, GenerationBackend, SamplingParams
from stepopsd.policy.backends.hf import HFBackend
from stepopsd.policy.backends.registry import (BackendEntry, UnknownBackendError, backend_names, get_backend,
                                               register_backend, set_backend_options)

__all__ = ["BackendEntry", "Generation", "GenerationBackend", "HFBackend", "SamplingParams", "UnknownBackendError",
           "backend_names", "get_backend", "register_backend", "set_backend_options"]
