"""Engine settings. Every field is both an `LLM(...)` keyword and a CLI flag (`--max-num-seqs`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None  # default: the model's own context length
    block_size: int = 16
    kv_cache_memory_gb: float = 0.5  # memory budget for the paged K/V tensors of all layers
    num_kv_blocks: int | None = None  # overrides the memory budget (tests use tiny caches)
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 64  # sequence budget of one step
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # While decodes are running, waiting requests are admitted only every `prefill_interval`
    # steps: 1 favours time-to-first-token, larger values favour smooth decoding.
    prefill_interval: int = 1
    attention_backend: str = "paged"
    # Pure decode steps of GGUF models as one C call for all layers (kernels/decode.py);
    # off: every step goes through the torch modules.
    native_decode: bool = True
    max_logprobs: int = 20
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "prefill_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
