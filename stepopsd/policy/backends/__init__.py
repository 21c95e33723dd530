"""Generation backends: the interface (`base`), the `transformers` implementation (`hf`) and vLLM (`vllm`, imported
only when rollout.backend=vllm: vLLM is an optional dependency)."""
from stepopsd.policy.backends.base import Generation, GenerationBackend, SamplingParams
from stepopsd.policy.backends.hf import HFBackend

__all__ = ["Generation", "GenerationBackend", "HFBackend", "SamplingParams"]
