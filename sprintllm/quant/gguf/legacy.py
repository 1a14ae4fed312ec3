"""Decoders for the 32-weight block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Each takes uint8 blocks [n, type_size] and returns float32 [n, 32]. The arithmetic
follows ggml's reference order (scale the integer, then add the offset) in float32,
so the results equal ggml's and the gguf package's bit for bit.

Nibble order: byte j holds weight j in its low nibble and weight j + 16 in its high
nibble (not weights 2j, 2j + 1).
"""

import torch

from .bits import f16_field, unpack_bits

# IQ4_NL's 16-level non-linear grid (kvalues_iq4nl in ggml-common.h), also used by IQ4_XS.
IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_GRID = torch.tensor(IQ4_GRID, dtype=torch.float32)


def iq4_lookup(idx: torch.Tensor) -> torch.Tensor:
    """Map 4-bit grid indices (uint8) to their float32 grid values."""
    return _IQ4_GRID.to(idx.device)[idx.long()]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return unpack_bits(qs, 4, 16)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5 high bits: a little-endian uint32 whose bit j belongs to weight j."""
    return unpack_bits(qh, 1, 1)


def q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | qs[16]; w = d * (q - 8)
    d = f16_field(blocks, 0)
    return _nibbles(blocks[:, 2:]).to(torch.float32).sub_(8).mul_(d)


def q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | m f16 | qs[16]; w = d * q + m
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    return _nibbles(blocks[:, 4:]).to(torch.float32).mul_(d).add_(m)


def q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | qh[4] | qs[16]; w = d * ((q | h << 4) - 16)
    d = f16_field(blocks, 0)
    q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return q.to(torch.float32).sub_(16).mul_(d)


def q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | m f16 | qh[4] | qs[16]; w = d * (q | h << 4) + m
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return q.to(torch.float32).mul_(d).add_(m)


def q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | qs[32] int8; w = d * q
    d = f16_field(blocks, 0)
    return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(d)


def iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | qs[16]; w = d * grid[q]
    d = f16_field(blocks, 0)
    return iq4_lookup(_nibbles(blocks[:, 2:])).mul_(d)
