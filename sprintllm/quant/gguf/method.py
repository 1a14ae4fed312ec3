"""GGUF weights kept in their block format: the QuantMethod of models loaded from .gguf files.

A layer's weight arrives as pieces of GGUF tensors (raw block rows, see
models.gguf_loader.GGUFTensor): a fused qkv or gate_up layer gets one piece per projection,
and the projections of one layer may differ in type (a Q4_K_M file stores attn_v and
ffn_down as Q6_K, the rest as Q4_K). `finalize` joins neighbouring pieces of one type into
one GGUFWeight (the C kernels' bound matmul; Q4_0/Q4_1/Q8_0 repacked for speed, same bytes)
and keeps the rest as separate column segments, each written into its slice of the output.
Float tensors (F32/F16/BF16) become dense matrices in the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import nn

from sprintllm.kernels.ops import GGUFWeight
from sprintllm.quant.base import Placement, QuantConfig, QuantMethod
from sprintllm.quant.gguf.dequant import dequantize
from sprintllm.quant.gguf.types import block_format

FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})


@dataclass(frozen=True)
class _Piece:
    row_offset: int
    qtype: T
    raw: torch.Tensor  # uint8 [rows, row_bytes]


class DenseSegment:
    """A float GGUF tensor as a dense matrix, with GGUFWeight's call signature."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.N, self.K = weight.shape

    def __repr__(self) -> str:
        return f"DenseSegment({self.weight.dtype}, N={self.N}, K={self.K})"

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight)
        return y if out is None else out.copy_(y)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(dtype)


def narrow_blocks(raw: torch.Tensor, qtype: T, shape: tuple[int, ...], place: Placement) -> torch.Tensor:
    """The rows [rows, row_bytes'] of `place`'s piece of a GGUF tensor: whole rows for a
    split of the output dim, whole blocks of every row for a split of the input dim."""
    if place.dim == 0:
        return raw.narrow(0, place.start, place.size)
    block, size = block_format(qtype).block_size, block_format(qtype).type_size
    if place.start % block or place.size % block:
        raise ValueError(f"cannot split {qtype.name} rows of {shape[-1]} values at {place.start}..."
                         f"{place.start + place.size}: not on its {block}-value block boundaries")
    return raw.narrow(1, place.start // block * size, place.size // block * size)


class GGUFMethod(QuantMethod):
    def create_weights(self, layer: nn.Module) -> None:
        # An empty marker under the name checkpoints load into; the blocks live in
        # `gguf_segments` once `finalize` has bound them.
        layer.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        layer.gguf_pieces = []
        layer.gguf_segments = []  # [(GGUFWeight or DenseSegment, first output column)]
        layer.gguf_dtype = torch.get_default_dtype()  # the model dtype, for float tensors

    def load(self, layer: nn.Module, param: nn.Parameter, loaded, place: Placement) -> None:
        if not hasattr(loaded, "ggml_type"):
            raise ValueError(f"a GGUF layer takes GGUF tensors, got {type(loaded).__name__}")
        K = place.size if place.dim == 1 else loaded.shape[-1]
        if K != layer.input_size or (place.size if place.dim == 0 else loaded.shape[0]) != place.rows:
            raise ValueError(f"shape mismatch: GGUF tensor {tuple(loaded.shape)} does not fit a layer of "
                             f"{layer.output_size} x {layer.input_size}")
        raw = narrow_blocks(loaded.data, loaded.ggml_type, loaded.shape, place)
        layer.gguf_pieces.append(_Piece(place.row_offset, T(loaded.ggml_type), raw))

    def finalize(self, layer: nn.Module) -> None:
        pieces = sorted(layer.gguf_pieces, key=lambda p: p.row_offset)
        layer.gguf_pieces = []
        runs: list[list[_Piece]] = []  # neighbouring pieces of one type
        for piece in pieces:
            if runs and runs[-1][-1].qtype == piece.qtype:
                runs[-1].append(piece)
            else:
                runs.append([piece])
        segments, end = [], 0
        for run in runs:
            if run[0].row_offset != end:
                raise ValueError(f"GGUF pieces leave output rows {end}..{run[0].row_offset} unfilled")
            raw = run[0].raw if len(run) == 1 else torch.cat([p.raw for p in run])
            segments.append((self._bind(raw, run[0].qtype, layer), end))
            end += raw.shape[0]
        if end != layer.output_size:
            raise ValueError(f"GGUF pieces fill {end} of {layer.output_size} output rows")
        layer.gguf_segments = segments

    @staticmethod
    def _bind(raw: torch.Tensor, qtype: T, layer: nn.Module):
        N, K = raw.shape[0], layer.input_size
        if qtype in FLOAT_TYPES:
            return DenseSegment(dequantize(raw, qtype, (N, K), layer.gguf_dtype))
        return GGUFWeight(raw if raw.stride(1) == 1 else raw.contiguous(), qtype, N, K)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        segments = layer.gguf_segments
        if len(segments) == 1:
            y = segments[0][0](x)
        else:
            y = torch.empty(x.shape[0], layer.output_size, dtype=torch.float32, device=x.device)
            for weight, column in segments:
                weight(x, y[:, column:column + weight.N])
        if bias is not None:
            y = y + bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        (table, _), = layer.gguf_segments  # an embedding is never fused: one tensor, one type
        return table.rows(ids, layer.gguf_dtype)


class GGUFConfig(QuantConfig):
    """Every layer of a GGUF model keeps the file's blocks."""

    name = "gguf"

    def method(self, layer_kind: str) -> QuantMethod:
        return GGUFMethod()
