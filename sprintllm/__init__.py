"""sprintllm: an LLM inference engine in Python on PyTorch."""
from sprintllm.config import EngineConfig
from sprintllm.llm import LLM
from sprintllm.outputs import CompletionOutput, RequestOutput
from sprintllm.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
