"""Decoders for the 256-weight super-block formats: Q2_K..Q6_K and IQ4_XS.

Each takes uint8 blocks [n, type_size] and returns float32 [n, 256]. A super-block
splits into sub-blocks (16 of 16 weights, or 8 of 32) with their own small integer
scale (and min), multiplied by the super-block's fp16 `d` (and `dmin`) first: the
per-weight arithmetic is `(d * sc) * q - (dmin * m)` in float32, ggml's order, so the
results equal ggml's and the gguf package's bit for bit.

The quants of a super-block are packed plane by plane over runs of 32 bytes (64 for
Q6_K's low nibbles; see `unpack_bits`): e.g. Q4_K's 128 nibble bytes are 4 runs of 32;
run r gives weights 64r..64r+31 from the low nibbles and 64r+32..64r+63 from the high
nibbles.
"""

import torch

from .bits import f16_field, unpack_bits
from .legacy import iq4_lookup


def _scaled(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """`scale * q - offset` per sub-block, in place: q float32 [n, 256], scale/offset [n, n_sub]."""
    n, n_sub = scale.shape
    w = q.view(n, n_sub, q.shape[1] // n_sub).mul_(scale.unsqueeze(-1))
    if offset is not None:
        w.sub_(offset.unsqueeze(-1))
    return q


def q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble scale, high nibble min) | qs[64] 2-bit | d f16 | dmin f16
    sc = blocks[:, :16]
    d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)
    q = unpack_bits(blocks[:, 16:80], 2, 32).to(torch.float32)
    return _scaled(q, d * (sc & 0xF).to(torch.float32), dmin * (sc >> 4).to(torch.float32))


def q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32] | qs[64] 2-bit | scales[12] (16 x 6-bit, signed by -32) | d f16
    hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = f16_field(blocks, 108)
    # Scale k: low 4 bits = nibble k // 8 of byte k % 8; high 2 bits = bit pair k // 4
    # of byte 8 + k % 4.
    scale = unpack_bits(sc[:, :8], 4, 8) | (unpack_bits(sc[:, 8:], 2, 4) << 4)
    # Bit b of hmask[j] is the third bit of weight 32b + j. The quant is stored
    # unsigned with offset 4: a *clear* hmask bit means "subtract 4".
    q = unpack_bits(qs, 2, 32) | (unpack_bits(hmask, 1, 32) << 2)
    return _scaled(q.to(torch.float32).sub_(4), d * scale.to(torch.float32).sub_(32))


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3: scales 0-3 (low 6 bits), top 2 bits = high bits of scales 4-7.
    Bytes 4-7: mins 0-3 (low 6 bits), top 2 bits = high bits of mins 4-7.
    Bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = of mins 4-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat([a & 0x3F, (c & 0xF) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scale.to(torch.float32), mins.to(torch.float32)


def q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | dmin f16 | scales[12] | qs[128] nibbles; 8 sub-blocks of 32
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    scale, mins = _k_scale_min(blocks[:, 4:16])
    q = unpack_bits(blocks[:, 16:], 4, 32).to(torch.float32)
    return _scaled(q, d * scale, dmin * mins)


def q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | dmin f16 | scales[12] | qh[32] | qs[128]; bit b of qh[j] is bit 4 of weight 32b + j
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    scale, mins = _k_scale_min(blocks[:, 4:16])
    q = unpack_bits(blocks[:, 48:], 4, 32) | (unpack_bits(blocks[:, 16:48], 1, 32) << 4)
    return _scaled(q.to(torch.float32), d * scale, dmin * mins)


def q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128] low nibbles (runs of 64) | qh[64] high 2 bits (runs of 32) | scales[16] int8 | d f16
    d = f16_field(blocks, 208)
    scale = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    q = unpack_bits(blocks[:, :128], 4, 64) | (unpack_bits(blocks[:, 128:192], 2, 32) << 4)
    return _scaled(q.to(torch.float32).sub_(32), d * scale)


def iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    # d f16 | scales_h u16 | scales_l[4] | qs[128]; 8 sub-blocks of 32, each 16 bytes of
    # grid nibbles (low nibbles = weights 0-15, high = 16-31), 6-bit scale signed by -32.
    d = f16_field(blocks, 0)
    # Sub-block i: low 4 bits = nibble i % 2 of scales_l[i // 2]; high 2 bits = bits
    # 2i, 2i+1 of the little-endian scales_h (bit pair i % 4 of its byte i // 4).
    scale = unpack_bits(blocks[:, 4:8], 4, 1) | (unpack_bits(blocks[:, 2:4], 2, 1) << 4)
    w = iq4_lookup(unpack_bits(blocks[:, 8:], 4, 16))
    return _scaled(w, d * scale.to(torch.float32).sub_(32))
