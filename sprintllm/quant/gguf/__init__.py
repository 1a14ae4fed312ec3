"""GGUF (llama.cpp) block formats: geometry and vectorised torch dequantization."""

from .dequant import dequantize, dequantize_rows
from .types import SUPPORTED_TYPES, BlockFormat, UnsupportedGGUFType, block_format, row_bytes

__all__ = [
    "SUPPORTED_TYPES",
    "BlockFormat",
    "UnsupportedGGUFType",
    "block_format",
    "dequantize",
    "dequantize_rows",
    "row_bytes",
]
