"""Native decode forward: all decoder layers of a Llama-family model in one C call.

    decoder = NativeDecoder(layers, final_norm, num_heads=9, num_kv_heads=3, head_dim=64,
                            rms_eps=1e-5, scale=64 ** -0.5, cos=rope.cos, sin=rope.sin,
                            kv_caches=kv_caches, block_size=16)
    hidden = decoder.forward(embeddings, positions, slot_mapping, block_tables, seq_lens)

For B decode tokens (one new token per sequence) it runs every layer -- RMSNorm, qkv
projection (+ bias), neox RoPE, K/V store into the paged cache, attention through the block
tables (with an optional sliding window), o projection, SwiGLU MLP -- and returns the
final-normed hidden states, inside one OpenMP parallel region (csrc/decode.c). A decode step
of a small model in torch is ~40 ops per layer at a few microseconds each; here the only
per-step Python is one ctypes call.

Matmuls use the GGUFWeight kernels (activations quantized to int8 per block), so results
match the torch model built on the same GGUFWeight objects up to float summation order.
The caller keeps the usual decode invariant positions[b] == seq_lens[b] - 1, and no
sequence reads a slot that another sequence of the batch writes in the same step.
"""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch

from . import ops
from .ops import GGUFWeight, _Plan

Linear = list[tuple[GGUFWeight, int]]  # column segments: y[:, off:off+w.N] = x @ w^T

MAX_SEGMENTS = 4  # csrc/decode.c: SL_MAX_SEGMENTS
MAX_HEAD_DIM = 256  # csrc/decode.c: SL_MAX_HEAD_DIM
_ERRORS = {
    1: "unsupported weight type", 2: "bad shape", 3: "out of memory",
    10: "position outside the rope table", 11: "seq_len must be > position and fit the block table",
    12: "slot outside the KV cache", 13: "block id outside the KV cache",
}


@dataclass
class DecoderLayerWeights:
    input_norm: torch.Tensor  # float32 [hidden]
    qkv: Linear  # output columns [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]
    qkv_bias: torch.Tensor | None  # float32 [(Hq+2Hkv)*D] (Qwen2), else None
    o: Linear  # [hidden] from [Hq*D]
    post_norm: torch.Tensor  # float32 [hidden]
    gate_up: Linear  # output [2*inter]: gate columns first, then up
    down: Linear  # [hidden] from [inter]
    sliding_window: int | None


class _Segment(ctypes.Structure):
    _fields_ = [("plan", _Plan), ("offset", ctypes.c_int64)]


class _Linear(ctypes.Structure):
    _fields_ = [("segs", ctypes.POINTER(_Segment)), ("n_segs", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("window", ctypes.c_int64)]


class _Decoder(ctypes.Structure):
    _fields_ = [("layers", ctypes.POINTER(_Layer)),
                *((name, ctypes.c_int64) for name in (
                    "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "inter", "block_size",
                    "num_blocks", "cache_bf16", "max_pos", "max_window")),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class _Workspace(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("rows", ctypes.c_int64), ("threads", ctypes.c_int64),
                ("act_bytes", ctypes.c_int64), ("error_index", ctypes.c_int64)]


def _entry_points(lib: ctypes.CDLL):
    """sl_decode_forward and sl_decode_ws_free with their signatures set."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    forward = lib.sl_decode_forward
    forward.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr]
    forward.restype = ctypes.c_int
    free = lib.sl_decode_ws_free
    free.argtypes, free.restype = [ctypes.POINTER(_Workspace)], None
    return forward, free


def _vector(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor of shape [{n}], got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    return t.detach().to(torch.float32).contiguous()


class NativeDecoder:
    """The decoder layers of one model bound once to their weights, norms, rope tables and
    KV caches (by address: a decoder must be rebuilt if the caches are reallocated);
    `forward` runs a decode step in one C call. Not safe to call from two threads at once
    (one workspace)."""

    def __init__(self, layers: list[DecoderLayerWeights], final_norm: torch.Tensor, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, rms_eps: float, scale: float,
                 cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int):
        lib = ops.kernels()
        if lib is None:
            raise ValueError("the native decoder needs the C kernels, which are unavailable here")
        if not layers:
            raise ValueError("no decoder layers")
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim <= 0 or head_dim % 2 or head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}")
        if len(kv_caches) != len(layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} layers")
        hidden = layers[0].input_norm.shape[0] if isinstance(layers[0].input_norm, torch.Tensor) else -1
        inter2 = sum(w.N for w, _ in layers[0].gate_up) if layers[0].gate_up else 0
        if hidden <= 0 or inter2 <= 0 or inter2 % 2:
            raise ValueError("cannot tell hidden/intermediate sizes from the first layer")
        inter, half = inter2 // 2, head_dim // 2
        cos, sin = (t.detach().to(torch.float32).contiguous() for t in (cos, sin))
        if cos.dim() != 2 or cos.shape[1] != half or sin.shape != cos.shape:
            raise ValueError(f"cos and sin must be [max_pos, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
        cache_shape = kv_caches[0][0].shape
        cache_dtype = kv_caches[0][0].dtype
        if (len(cache_shape) != 4 or cache_shape[1] != block_size or cache_shape[2:] != (num_kv_heads, head_dim)
                or cache_dtype not in (torch.float32, torch.bfloat16)):
            raise ValueError(f"KV caches must be float32 or bfloat16 [num_blocks, {block_size}, {num_kv_heads}, "
                             f"{head_dim}], got {cache_dtype} {tuple(cache_shape)}")
        for k, v in kv_caches:
            for t in (k, v):
                if t.shape != cache_shape or t.dtype != cache_dtype or not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError("every KV cache tensor must be a contiguous CPU tensor of the same shape "
                                     f"and dtype as the first ({cache_dtype} {tuple(cache_shape)})")

        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self._keep: list = [cos, sin]  # everything the C structs point at
        c_layers = (_Layer * len(layers))()
        windows = []
        for i, (lw, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches)):
            where = f"layer {i}"
            bias = None
            if lw.qkv_bias is not None:
                bias = _vector(lw.qkv_bias, q_size + 2 * kv_size, f"{where} qkv_bias")
            norms = [_vector(lw.input_norm, hidden, f"{where} input_norm"),
                     _vector(lw.post_norm, hidden, f"{where} post_norm")]
            window = lw.sliding_window
            if window is not None and window <= 0:
                raise ValueError(f"{where}: sliding_window must be positive, got {window}")
            windows.append(window)
            self._keep += [bias, *norms, k_cache, v_cache]
            c_layers[i] = _Layer(
                norms[0].data_ptr(), norms[1].data_ptr(), bias.data_ptr() if bias is not None else None,
                k_cache.data_ptr(), v_cache.data_ptr(),
                self._linear(lw.qkv, q_size + 2 * kv_size, hidden, f"{where} qkv"),
                self._linear(lw.o, hidden, q_size, f"{where} o"),
                self._linear(lw.gate_up, 2 * inter, hidden, f"{where} gate_up"),
                self._linear(lw.down, hidden, inter, f"{where} down"),
                window or 0)
        final = _vector(final_norm, hidden, "final_norm")
        self._keep += [final, c_layers]
        max_window = 0 if any(w is None for w in windows) else max(windows)
        self._decoder = _Decoder(
            c_layers, len(layers), hidden, num_heads, num_kv_heads, head_dim, inter, block_size,
            cache_shape[0], int(cache_dtype == torch.bfloat16), cos.shape[0], max_window,
            cos.data_ptr(), sin.data_ptr(), final.data_ptr(), float(rms_eps), float(scale))
        self.hidden_size, self.num_layers = hidden, len(layers)
        self._forward, free = _entry_points(lib.lib)
        self._ws = _Workspace()
        self._addr = ctypes.addressof(self._decoder)
        self._ws_addr = ctypes.addressof(self._ws)
        weakref.finalize(self, free, self._ws)  # frees the C workspace (the finalizer keeps _ws alive)

    def _linear(self, segments: Linear, N: int, K: int, what: str) -> _Linear:
        if not 1 <= len(segments) <= MAX_SEGMENTS:
            raise ValueError(f"{what}: 1 to {MAX_SEGMENTS} segments, got {len(segments)}")
        arr = (_Segment * len(segments))()
        covered = 0
        for j, (w, off) in enumerate(sorted(segments, key=lambda s: s[1])):
            if not isinstance(w, GGUFWeight) or w._run is None:
                raise ValueError(f"{what}: {w!r} has no C kernel (only GGUFWeights bound to the C kernels "
                                 "run natively)")
            if w.K != K:
                raise ValueError(f"{what}: segment has K={w.K}, expected {K}")
            if off != covered:
                raise ValueError(f"{what}: segments must tile the {N} output columns; a gap or overlap at column {off}")
            arr[j] = _Segment(w._plan, off)
            covered += w.N
            self._keep.append(w)
        if covered != N:
            raise ValueError(f"{what}: segments cover {covered} output columns, expected {N}")
        self._keep.append(arr)
        return _Linear(arr, len(segments))

    @staticmethod
    def available() -> bool:
        return ops.available()

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """hidden float32 [B, hidden] (the embeddings), positions int64 [B], slot_mapping int64
        [B], block_tables int32 [B, max_blocks], seq_lens int32 [B] (including the new token)
        -> float32 [B, hidden] after the final RMSNorm. Writes each token's K/V to the cache."""
        B = hidden.shape[0]
        if not (hidden.dtype is torch.float32 and positions.dtype is torch.int64
                and slot_mapping.dtype is torch.int64 and block_tables.dtype is torch.int32
                and seq_lens.dtype is torch.int32 and hidden.is_contiguous() and positions.is_contiguous()
                and slot_mapping.is_contiguous() and seq_lens.is_contiguous() and block_tables.dim() == 2
                and block_tables.stride(1) == 1 and hidden.device.type == "cpu"):
            hidden, positions, slot_mapping, block_tables, seq_lens = self._normalize(
                hidden, positions, slot_mapping, block_tables, seq_lens)
        if (hidden.shape != (B, self.hidden_size) or positions.shape != (B,) or slot_mapping.shape != (B,)
                or seq_lens.shape != (B,) or block_tables.shape[0] != B):
            raise ValueError(f"expected hidden [B, {self.hidden_size}], positions/slot_mapping/seq_lens [B] and "
                             f"block_tables [B, max_blocks]; got {tuple(hidden.shape)}, {tuple(positions.shape)}, "
                             f"{tuple(slot_mapping.shape)}, {tuple(seq_lens.shape)}, {tuple(block_tables.shape)}")
        out = torch.empty(B, self.hidden_size)
        rc = self._forward(self._addr, self._ws_addr, hidden.data_ptr(), B, positions.data_ptr(),
                           slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
                           seq_lens.data_ptr(), out.data_ptr())
        if rc:
            index = self._ws.error_index
            where = f" (sequence {index})" if rc >= 10 and index >= 0 else ""
            raise ValueError(f"native decode: {_ERRORS.get(rc, f'error {rc}')}{where}")
        return out

    __call__ = forward

    @staticmethod
    def _normalize(hidden, positions, slot_mapping, block_tables, seq_lens):
        """The inputs as the C side takes them (the slow path: dtype or layout conversions)."""
        tensors = (hidden, positions, slot_mapping, block_tables, seq_lens)
        if any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" for t in tensors):
            raise ValueError("native decode inputs must be CPU tensors")
        if block_tables.dim() != 2:
            raise ValueError(f"block_tables must be [B, max_blocks], got {tuple(block_tables.shape)}")
        block_tables = block_tables.to(torch.int32)
        if block_tables.stride(1) != 1:
            block_tables = block_tables.contiguous()
        return (hidden.to(torch.float32).contiguous(), positions.to(torch.int64).contiguous(),
                slot_mapping.to(torch.int64).contiguous(), block_tables, seq_lens.to(torch.int32).contiguous())
