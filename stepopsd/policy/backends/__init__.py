"""Generation backends: the interface (`base`) and the `transformers` implementation (`hf`)."""
from stepopsd.policy.backends.base import Generation, GenerationBackend, SamplingParams
from stepopsd.policy.backends.hf import HFBackend

__all__ = ["Generation", "GenerationBackend", "HFBackend", "SamplingParams"]
