"""x @ W^T with W a GGUF-quantized matrix, through the C kernels (torch fallback).

    y = gguf_matmul(x, raw, qtype, N, K)     # x [M, K] f32/bf16; raw uint8 [N, row_bytes] GGUF rows
    w = GGUFWeight(raw, qtype, N, K)         # once, at load: packs Q4_0/Q4_1/Q8_0 (same bytes)
    y = w(x)                                 # per forward: the fast path for linear layers

Small M (decode, small batches): the activations are quantized to int8 per block (a float
scale per 32 values, per 256 for k-quants) and dotted with the weight blocks in integers
(AVX-512 VNNI), as llama.cpp does; the result differs from the exact product by the
activation rounding only (`error_bound`). `GGUFWeight` keeps Q4_0/Q4_1/Q8_0 in a 16-row
interleaved layout (csrc/packed.c) whose dot kernel is ~3x cheaper than on GGUF rows and
runs at DRAM bandwidth; it also beats dequantize + GEMM at every batch measured (M <= 512).
The GGUF-rows kernels scale worse with M: from DENSE_MIN_ROWS rows on, the C kernels
dequantize to bfloat16 and torch (oneDNN) multiplies, with bf16 rounding of weights,
activations and output.

Without a compiler (or with SPRINTLLM_NO_KERNELS=1) `available()` is False and both entry
points dequantize with sprintllm.quant.gguf and multiply in float32.
"""
from __future__ import annotations

import ctypes
import os
import warnings

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from sprintllm.quant.gguf import dequantize as torch_dequantize

from .build import KernelBuildError, load_library

# qtype -> (weights per block, bytes per block) of the types the C kernels implement.
KERNEL_TYPES: dict[int, tuple[int, int]] = {
    T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q5_0: (32, 22), T.Q5_1: (32, 24), T.Q8_0: (32, 34),
    T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210),
}
PACKED_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q8_0})
# Activation rows from which dequantizing to bf16 + torch's GEMM beats the int8 kernels, by
# kernel: "packed" (GGUFWeight's Q4_0/Q4_1/Q8_0) or the GGUF-rows kernel of a type. The
# packed kernel won at every M measured (up to 512); the rows kernels scale worse with M.
# Measured crossovers in docs/bench_kernels.md.
DENSE_MIN_ROWS: dict[str | int, int] = {
    "packed": 1 << 30,
    T.Q4_0: 24, T.Q4_1: 24, T.Q5_0: 24, T.Q5_1: 24, T.Q8_0: 24,
    T.Q4_K: 24, T.Q5_K: 24, T.Q6_K: 6,
}
_ERRORS = {1: "unsupported type", 2: "bad shape", 3: "out of memory"}


class _Plan(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("w_stride", ctypes.c_int64), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("qtype", ctypes.c_int32), ("packed", ctypes.c_int32)]


class _Kernels:
    """The loaded library with its entry points' signatures set once (lean calls)."""

    def __init__(self, lib: ctypes.CDLL):
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        signatures = {
            "sl_gguf_matmul": [ptr, i32, i64, i64, ptr, i64, i32, i64, ptr, i64],
            "sl_plan_matmul": [ptr, ptr, i64, ptr, i64, i32],
            "sl_dequantize": [ptr, i64, i32, i64, i64, ptr, i32],
            "sl_dequantize_packed": [ptr, i32, i64, i64, ptr, i32],
            "sl_pack": [ptr, i64, i32, i64, i64, ptr],
            "sl_unpack": [ptr, i32, i64, i64, ptr],
            "sl_gather_rows": [ptr, i64, i32, i32, i64, i64, ptr, i64, ptr, i32],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, i32
            setattr(self, name[3:], fn)
        lib.sl_pack_size.argtypes, lib.sl_pack_size.restype = [i32, i64, i64], i64
        self.pack_size = lib.sl_pack_size
        lib.sl_contention_backoffs.argtypes, lib.sl_contention_backoffs.restype = [], i64
        self.contention_backoffs = lib.sl_contention_backoffs
        self.simd = bool(lib.sl_is_simd())
        self.lib = lib


_kernels: _Kernels | None = None
_load_failed = False


def kernels() -> _Kernels | None:
    """The native kernels, built on first use; None (after one warning) if they cannot be."""
    global _kernels, _load_failed
    if _kernels is None and not _load_failed:
        if os.environ.get("SPRINTLLM_NO_KERNELS"):
            _load_failed = True
            return None
        try:
            _kernels = _Kernels(load_library())
        except KernelBuildError as exc:
            _load_failed = True
            first_line = str(exc).splitlines()[0]
            warnings.warn(f"sprintllm C kernels unavailable, using the torch fallback: {first_line}",
                          RuntimeWarning, stacklevel=2)
    return _kernels


def available() -> bool:
    return kernels() is not None


def supports(qtype: int, K: int) -> bool:
    """Whether the C kernels take this weight type with rows of K values."""
    fmt = KERNEL_TYPES.get(qtype)
    return fmt is not None and K > 0 and K % fmt[0] == 0


def _check_raw(raw: torch.Tensor, qtype: int, N: int, K: int) -> None:
    block, size = KERNEL_TYPES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape != (N, K // block * size) or raw.stride(1) != 1:
        raise ValueError(f"raw must be uint8 [{N}, {K // block * size}] with contiguous rows, "
                         f"got {raw.dtype} {tuple(raw.shape)} strides {raw.stride()}")


def _check_out(out: torch.Tensor, M: int, N: int) -> int:
    """The row stride of a valid `out`: float32 [M, N] with contiguous rows, such as a
    column slice of a wider buffer."""
    if out.dtype != torch.float32 or out.shape != (M, N) or out.stride(1) != 1 or out.stride(0) < N:
        raise ValueError(f"out must be a float32 [{M}, {N}] tensor with contiguous rows, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    return out.stride(0)


def _activations(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [M, {K}], got {tuple(x.shape)}")
    if x.dtype is not torch.float32 and x.dtype is not torch.bfloat16:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


def _raise_on(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed: {_ERRORS.get(rc, rc)}")


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) @ W^T -> float32 [M, N]; W is [N, K] stored as `raw`
    (uint8 [N, row_bytes]: whole GGUF rows, any row stride). `out`, if given, receives the
    result: float32 [M, N] with contiguous rows (a column slice of a wider buffer is fine)."""
    lib = _kernels if _kernels is not None else kernels()
    if lib is None or not x.is_cpu or not supports(qtype, K):
        y = fallback_matmul(x, raw, qtype, N, K)
        return y if out is None else out.copy_(y)
    _check_raw(raw, qtype, N, K)
    x = _activations(x, K)
    M = x.shape[0]
    if M >= DENSE_MIN_ROWS[qtype]:
        y = F.linear(x.to(torch.bfloat16), dequantize(raw, qtype, N, K, torch.bfloat16))
        return y.float() if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(M, N)
    stride = _check_out(out, M, N)
    _raise_on(lib.gguf_matmul(x.data_ptr(), x.dtype is torch.bfloat16, M, K, raw.data_ptr(), raw.stride(0),
                              qtype, N, out.data_ptr(), stride), "sl_gguf_matmul")
    return out


class GGUFWeight:
    """A GGUF weight [N, K] bound once for y = x @ W^T, the form linear layers want.

    Q4_0/Q4_1/Q8_0 are repacked into the kernels' 16-row layout (the same number of bytes;
    `raw` is not kept). Other kernel types keep their GGUF rows; types without a C kernel,
    or no kernels at all, use the torch fallback. For fused projections (qkv, gate_up) of
    one type, concatenate the shards' raw rows first and bind them as one weight.
    """

    def __init__(self, raw: torch.Tensor, qtype: int, N: int, K: int):
        self.qtype, self.N, self.K = T(qtype), N, K
        lib = kernels()
        self._lib = lib if lib is not None and supports(qtype, K) else None
        self.packed = self._lib is not None and self.qtype in PACKED_TYPES
        self._run = None
        if self._lib is None:
            self.data = raw
            return
        _check_raw(raw, qtype, N, K)
        if self.packed:
            self.data = torch.empty(lib.pack_size(qtype, N, K), dtype=torch.uint8)
            _raise_on(lib.pack(raw.data_ptr(), raw.stride(0), qtype, N, K, self.data.data_ptr()), "sl_pack")
        else:
            self.data = raw
        self._plan = _Plan(self.data.data_ptr(), 0 if self.packed else raw.stride(0), N, K, int(qtype),
                           int(self.packed))
        self._plan_addr = ctypes.addressof(self._plan)
        self._kernel = "packed" if self.packed else self.qtype
        self._run = self._lib.plan_matmul

    def __reduce__(self):
        # Rebuilt from GGUF rows on copy/pickle: a copied _Plan would point at the old bytes.
        return GGUFWeight, (self.raw(), self.qtype, self.N, self.K)

    def __repr__(self) -> str:
        kind = "packed" if self.packed else "GGUF rows" if self._lib else "torch fallback"
        return f"GGUFWeight({self.qtype.name}, N={self.N}, K={self.K}, {kind})"

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] (float32 or bfloat16) -> float32 [M, N] (into `out` if given: float32
        [M, N] with contiguous rows, e.g. a column slice of a wider qkv buffer).

        The common case -- a contiguous 2-D CPU x of a kernel dtype, small M -- costs about
        1 us of Python around the C call; anything else takes `_general`."""
        run = self._run
        if run is None or not x.is_cpu or x.dim() != 2:
            return self._general(x, out)
        M, K = x.shape
        dtype = x.dtype
        if (K != self.K or M >= DENSE_MIN_ROWS[self._kernel] or not x.is_contiguous()
                or (dtype is not torch.float32 and dtype is not torch.bfloat16)):
            return self._general(x, out)
        if out is None:
            out = torch.empty(M, self.N)
            stride = self.N
        else:
            stride, step = out.stride()
            if out.dtype is not torch.float32 or out.shape != (M, self.N) or step != 1 or stride < self.N:
                stride = _check_out(out, M, self.N)
        if run(self._plan_addr, x.data_ptr(), M, out.data_ptr(), stride, dtype is torch.bfloat16):
            raise RuntimeError("sl_plan_matmul failed")
        return out

    def _general(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Every case the fast path of __call__ does not take. Without a kernel the weight is
        dequantized on every call: a layer that must run so should cache a dense copy."""
        if self._run is None or not x.is_cpu:
            y = F.linear(x.float(), self.dequantize().to(x.device))
            return y if out is None else out.copy_(y)
        x = _activations(x, self.K)
        if x.shape[0] >= DENSE_MIN_ROWS[self._kernel]:
            y = F.linear(x.to(torch.bfloat16), self.dequantize(torch.bfloat16))
            return y.float() if out is None else out.copy_(y)
        return self(x, out)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] as float32 (bit-identical to sprintllm.quant.gguf) or bfloat16."""
        if not self.packed:
            return dequantize(self.data, self.qtype, self.N, self.K, dtype)
        if dtype not in (torch.float32, torch.bfloat16):
            return self.dequantize().to(dtype)
        w = torch.empty(self.N, self.K, dtype=dtype)
        _raise_on(self._lib.dequantize_packed(self.data.data_ptr(), self.qtype, self.N, self.K, w.data_ptr(),
                                              dtype == torch.bfloat16), "sl_dequantize_packed")
        return w

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized rows W[ids] [len(ids), K]: an embedding lookup on a quantized table
        (only the rows asked for are expanded)."""
        ids = ids.reshape(-1)
        if self._lib is None or dtype not in (torch.float32, torch.bfloat16):
            return torch_dequantize(self.data[ids.to(torch.long)], self.qtype, (ids.numel(), self.K), dtype)
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), self.K, dtype=dtype)
        stride = 0 if self.packed else self.data.stride(0)
        rc = self._lib.gather_rows(self.data.data_ptr(), stride, int(self.packed), int(self.qtype), self.N, self.K,
                                   ids.data_ptr(), ids.numel(), out.data_ptr(), dtype == torch.bfloat16)
        if rc == 2:
            raise IndexError(f"row index out of range for a weight of {self.N} rows")
        _raise_on(rc, "sl_gather_rows")
        return out

    def raw(self) -> torch.Tensor:
        """The GGUF rows [N, row_bytes] (rebuilt from the packed layout, if packed)."""
        if not self.packed:
            return self.data
        block, size = KERNEL_TYPES[self.qtype]
        rows = torch.empty(self.N, self.K // block * size, dtype=torch.uint8)
        _raise_on(self._lib.unpack(self.data.data_ptr(), self.qtype, self.N, self.K, rows.data_ptr()), "sl_unpack")
        return rows


def dequantize(raw: torch.Tensor, qtype: int, N: int, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] from GGUF rows as float32 (bit-identical to sprintllm.quant.gguf.dequantize)
    or bfloat16, by the C kernels when they take the type."""
    lib = kernels()
    if lib is None or not supports(qtype, K) or dtype not in (torch.float32, torch.bfloat16):
        return torch_dequantize(raw, qtype, (N, K), dtype)
    _check_raw(raw, qtype, N, K)
    w = torch.empty(N, K, dtype=dtype)
    _raise_on(lib.dequantize(raw.data_ptr(), raw.stride(0), qtype, N, K, w.data_ptr(), dtype == torch.bfloat16),
              "sl_dequantize")
    return w


def fallback_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int) -> torch.Tensor:
    """The torch path: exact float32 dequantization, float32 matmul."""
    w = torch_dequantize(raw, qtype, (N, K), torch.float32).to(x.device)
    return F.linear(x.float(), w)


def error_bound(x: torch.Tensor, w: torch.Tensor, qtype: int) -> torch.Tensor:
    """Worst-case |int8 path - x @ w.T|, [M, N], before float rounding.

    Each activation is rounded to the nearest multiple of d = amax / 127 of its scale block
    (32 values, 256 for k-quants), so |x - x_q| <= amax / 254 and
    |sum_k w_nk (x_mk - xq_mk)| <= sum_blocks amax_mb / 254 * sum_{k in b} |w_nk|.
    """
    bs = KERNEL_TYPES[qtype][0]
    M, K = x.shape
    amax = x.double().abs().reshape(M, K // bs, bs).amax(-1)  # [M, blocks]
    wabs = w.double().abs().reshape(w.shape[0], K // bs, bs).sum(-1)  # [N, blocks]
    return amax @ wabs.T / 254
