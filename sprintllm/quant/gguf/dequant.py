"""Dequantize GGUF tensors from their raw bytes, vectorised over all blocks.

`raw` is the tensor's bytes as stored in the file (uint8, little-endian, whole rows).
Rows are independent, so a layer can keep the raw bytes and decode a range of rows
(output features) at a time with `dequantize_rows`.
"""

from collections.abc import Callable, Sequence
from math import prod

import torch
from gguf import GGMLQuantizationType as T

from . import kquants, legacy
from .types import BlockFormat, block_format, row_bytes

# uint8 blocks [n, type_size] -> float32 [n, block_size]
_DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q4_0: legacy.q4_0,
    T.Q4_1: legacy.q4_1,
    T.Q5_0: legacy.q5_0,
    T.Q5_1: legacy.q5_1,
    T.Q8_0: legacy.q8_0,
    T.IQ4_NL: legacy.iq4_nl,
    T.Q2_K: kquants.q2_k,
    T.Q3_K: kquants.q3_k,
    T.Q4_K: kquants.q4_k,
    T.Q5_K: kquants.q5_k,
    T.Q6_K: kquants.q6_k,
    T.IQ4_XS: kquants.iq4_xs,
}

# Unquantized types are a reinterpretation of the bytes.
_FLOATS: dict[T, torch.dtype] = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def dequantize(
    raw: torch.Tensor,
    qtype: T | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode the whole tensor to `shape` (logical, row-major, last dim = row length).

    For F32/F16/BF16 read as their own dtype the result is a view of `raw`.
    """
    fmt = block_format(qtype)
    rows = _as_rows(raw, fmt, shape)
    return _decode(rows, fmt, shape[-1], dtype).reshape(tuple(shape))


def dequantize_rows(
    raw: torch.Tensor,
    qtype: T | int,
    shape: Sequence[int],
    start: int,
    stop: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode rows [start, stop) of the tensor (rows = all leading dims flattened).

    Returns [stop - start, shape[-1]]; only those rows' bytes are read.
    """
    fmt = block_format(qtype)
    rows = _as_rows(raw, fmt, shape)
    if not 0 <= start <= stop <= rows.shape[0]:
        raise IndexError(f"row range [{start}, {stop}) is outside the tensor's {rows.shape[0]} rows")
    return _decode(rows[start:stop], fmt, shape[-1], dtype)


def _as_rows(raw: torch.Tensor, fmt: BlockFormat, shape: Sequence[int]) -> torch.Tensor:
    """Validate `raw` against `shape` and return it as uint8 [n_rows, bytes per row]."""
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGUF data must be a uint8 tensor of bytes, got {raw.dtype}")
    if len(shape) == 0:
        raise ValueError("shape needs at least one dimension (the row length)")
    n_rows, per_row = prod(shape[:-1]), row_bytes(fmt.qtype, shape[-1])
    if raw.numel() != n_rows * per_row:
        raise ValueError(
            f"{fmt.qtype.name} tensor of shape {tuple(shape)} needs {n_rows} rows x {per_row} bytes"
            f" = {n_rows * per_row} bytes, but raw holds {raw.numel()}"
        )
    return raw.reshape(n_rows, per_row)


def _decode(rows: torch.Tensor, fmt: BlockFormat, row_len: int, dtype: torch.dtype) -> torch.Tensor:
    if fmt.qtype in _FLOATS:
        return rows.view(_FLOATS[fmt.qtype]).to(dtype)
    blocks = rows.reshape(-1, fmt.type_size)
    return _DECODERS[fmt.qtype](blocks).reshape(rows.shape[0], row_len).to(dtype)
