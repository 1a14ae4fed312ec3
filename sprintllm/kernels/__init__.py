"""sprintllm's own C kernels (compiled on first use, loaded with ctypes).

    from sprintllm.kernels import GGUFWeight, gguf_matmul
    y = gguf_matmul(x, raw, qtype, N, K)   # x [M, K] @ W^T, W as raw GGUF rows [N, row_bytes]
    w = GGUFWeight(raw, qtype, N, K)       # bind (and repack) once at load time ...
    y = w(x)                               # ... then the lean, fastest call per forward
"""
from .build import KernelBuildError
from .ops import (
    KERNEL_TYPES,
    PACKED_TYPES,
    GGUFWeight,
    available,
    dequantize,
    error_bound,
    fallback_matmul,
    gguf_matmul,
    supports,
)

__all__ = [
    "KERNEL_TYPES",
    "PACKED_TYPES",
    "GGUFWeight",
    "KernelBuildError",
    "available",
    "dequantize",
    "error_bound",
    "fallback_matmul",
    "gguf_matmul",
    "supports",
]
