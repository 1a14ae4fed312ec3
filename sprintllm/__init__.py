"""sprintllm: an LLM inference engine in Python on PyTorch."""
from sprintllm.config import EngineConfig
from sprintllm.sampling_params import SamplingParams

__all__ = ["EngineConfig", "SamplingParams"]
