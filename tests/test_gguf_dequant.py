"""sprintllm's torch GGUF dequantization against the gguf package's numpy reference.

Both sides compute in float32 in ggml's operation order, so the comparison is exact
(torch.equal), not approximate.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as ref

from sprintllm.quant.gguf import (
    SUPPORTED_TYPES,
    UnsupportedGGUFType,
    block_format,
    dequantize,
    dequantize_rows,
    row_bytes,
)

# Byte offsets of each block's fp16 fields (d, and dmin/m where present). Random bytes
# there could be inf/nan; the tests overwrite them with moderate finite values.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.IQ4_NL: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_XS: [0],
}
BLOCK_TYPES = list(F16_FIELDS)
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
SHAPES = [(1, 1), (3, 2), (7, 5), (2, 3, 4)]  # (..., blocks per row)


def random_blocks(qtype: T, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random raw bytes for a tensor of `shape` in block units, with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    fmt = block_format(qtype)
    raw = rng.integers(0, 256, size=(*shape, fmt.type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=(*shape, 1)).astype(np.float16)
        raw[..., offset : offset + 2] = scale.view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] * fmt.type_size)


def logical_shape(qtype: T, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], shape[-1] * block_format(qtype).block_size)


def test_table_matches_gguf_sizes():
    for qtype, fmt in SUPPORTED_TYPES.items():
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype], qtype.name
    assert set(SUPPORTED_TYPES) == set(BLOCK_TYPES + FLOAT_TYPES)


def test_row_bytes():
    assert row_bytes(T.Q4_K, 1536) == 6 * 144
    assert row_bytes(T.Q4_1, 576) == 18 * 20
    assert row_bytes(T.F16, 7) == 14
    with pytest.raises(ValueError, match="whole blocks of 256"):
        row_bytes(T.Q6_K, 576)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_blocks_match_reference(qtype, shape):
    raw = random_blocks(qtype, shape, seed=sum(shape) + qtype.value)
    expected = ref.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw), qtype, logical_shape(qtype, shape))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert torch.equal(got, torch.from_numpy(expected))


LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


@pytest.mark.parametrize("qtype", LEGACY + FLOAT_TYPES, ids=lambda t: t.name)
def test_quantized_weights_match_reference(qtype):
    weights = np.random.default_rng(0).standard_normal((6, 4 * 32)).astype(np.float32)
    raw = np.ascontiguousarray(ref.quantize(weights, qtype)).view(np.uint8)
    got = dequantize(torch.from_numpy(raw), qtype, weights.shape)
    assert torch.equal(got, torch.from_numpy(ref.dequantize(raw, qtype)))
    assert torch.allclose(got, torch.from_numpy(weights), atol=0.4)  # a sanity bound on the round trip


@pytest.mark.parametrize("qtype", BLOCK_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_row_range_equals_slice_of_full(qtype):
    fmt = block_format(qtype)
    shape = (2, 5, 3 * fmt.block_size)
    if qtype in FLOAT_TYPES:
        raw = torch.randn(shape).to({T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype])
        raw = raw.view(torch.uint8)
    else:
        raw = torch.from_numpy(random_blocks(qtype, (2, 5, 3), seed=1))
    full = dequantize(raw, qtype, shape).reshape(10, -1)
    for start, stop in [(0, 10), (3, 7), (9, 10), (4, 4)]:
        assert torch.equal(dequantize_rows(raw, qtype, shape, start, stop), full[start:stop])
    with pytest.raises(IndexError):
        dequantize_rows(raw, qtype, shape, 8, 11)


def test_output_dtype_is_rounded_from_float32():
    raw = torch.from_numpy(random_blocks(T.Q4_K, (4, 2), seed=2))
    full = dequantize(raw, T.Q4_K, (4, 512))
    assert torch.equal(dequantize(raw, T.Q4_K, (4, 512), dtype=torch.bfloat16), full.to(torch.bfloat16))


def test_unsupported_type_names_it_and_the_supported_ones():
    raw = torch.zeros(66, dtype=torch.uint8)
    with pytest.raises(UnsupportedGGUFType, match=r"IQ2_XXS is not supported.*Q4_K") as info:
        dequantize(raw, T.IQ2_XXS, (1, 256))
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedGGUFType, match="12345"):
        block_format(12345)


def test_byte_size_mismatch_is_a_clear_error():
    raw = torch.zeros(3 * 144 - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"Q4_K tensor of shape \(3, 256\) needs 3 rows x 144 bytes = 432"):
        dequantize(raw, T.Q4_K, (3, 256))
    with pytest.raises(ValueError, match="whole blocks of 32"):
        dequantize(torch.zeros(18, dtype=torch.uint8), T.Q4_0, (1, 31))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(8, dtype=torch.float16), T.F16, (8,))
