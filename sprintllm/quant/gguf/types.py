"""The ggml tensor types sprintllm can decode, and their block geometry.

A ggml row is a run of fixed-size blocks: `block_size` weights stored in `type_size`
bytes. Rows never split a block, so a row of `n` weights takes
`n // block_size * type_size` bytes and rows can be decoded independently.
"""

from dataclasses import dataclass

from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class BlockFormat:
    qtype: GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block


class UnsupportedGGUFType(ValueError):
    """A tensor uses a ggml type that sprintllm does not decode."""

    def __init__(self, qtype):
        name = getattr(qtype, "name", str(qtype))
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        super().__init__(f"GGUF tensor type {name} is not supported; supported types: {supported}")
        self.qtype = qtype


def _table(*rows: tuple[str, int, int]) -> dict[GGMLQuantizationType, BlockFormat]:
    return {GGMLQuantizationType[name]: BlockFormat(GGMLQuantizationType[name], bs, ts) for name, bs, ts in rows}


# Sizes are facts of the ggml formats (ggml-common.h); the tests check them against
# the gguf package's GGML_QUANT_SIZES.
SUPPORTED_TYPES: dict[GGMLQuantizationType, BlockFormat] = _table(
    ("F32", 1, 4),
    ("F16", 1, 2),
    ("BF16", 1, 2),
    ("Q4_0", 32, 18),  # d f16, 16 B nibbles
    ("Q4_1", 32, 20),  # d f16, m f16, 16 B nibbles
    ("Q5_0", 32, 22),  # d f16, 4 B high bits, 16 B nibbles
    ("Q5_1", 32, 24),  # d f16, m f16, 4 B high bits, 16 B nibbles
    ("Q8_0", 32, 34),  # d f16, 32 int8
    ("Q2_K", 256, 84),  # 16 B scales|mins, 64 B 2-bit, d f16, dmin f16
    ("Q3_K", 256, 110),  # 32 B hmask, 64 B 2-bit, 12 B 6-bit scales, d f16
    ("Q4_K", 256, 144),  # d f16, dmin f16, 12 B 6-bit scales+mins, 128 B nibbles
    ("Q5_K", 256, 176),  # d f16, dmin f16, 12 B scales+mins, 32 B high bits, 128 B nibbles
    ("Q6_K", 256, 210),  # 128 B low nibbles, 64 B high 2 bits, 16 int8 scales, d f16
    ("IQ4_NL", 32, 18),  # d f16, 16 B nibbles indexing a non-linear grid
    ("IQ4_XS", 256, 136),  # d f16, 2 B scales_h, 4 B scales_l, 128 B grid nibbles
)


def block_format(qtype: GGMLQuantizationType | int) -> BlockFormat:
    """The block geometry of `qtype`; raises UnsupportedGGUFType for any other type."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedGGUFType(qtype) from None
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedGGUFType(qtype)
    return SUPPORTED_TYPES[qtype]


def row_bytes(qtype: GGMLQuantizationType | int, row_len: int) -> int:
    """Bytes taken by one row of `row_len` weights stored as `qtype`."""
    fmt = block_format(qtype)
    if row_len < 0 or row_len % fmt.block_size:
        raise ValueError(
            f"a {fmt.qtype.name} row holds whole blocks of {fmt.block_size} weights; got row length {row_len}"
        )
    return row_len // fmt.block_size * fmt.type_size
