"""How a linear (or embedding) layer stores and applies its weight.

A layer knows its place in the tensor-parallel group and works out, for each checkpoint
tensor, which part of it belongs to this rank and where that part goes in the layer's
output rows (a `Placement`). Its `QuantMethod` decides what to keep: a dense matrix in the
model dtype, a GGUF block matrix, int8 with scales... so that every method serves the same
models, loaders and tensor parallelism.

    method.create_weights(layer)             # at construction: register what will be loaded
    method.load(layer, param, tensor, place) # per checkpoint tensor (or shard of a fused one)
    method.finalize(layer)                   # once all tensors are in: repack, bind kernels
    y = method.apply(layer, x, bias)         # x [T, K] -> x @ W^T + bias [T, N], in x's dtype
    rows = method.embed(layer, ids)          # embedding lookup, for embedding layers
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor's piece lands in this rank's weight [N, K].

    The piece is entries [start, start + size) of the checkpoint tensor along `dim` (0: its
    output rows, 1: its input columns); it fills output rows [row_offset, row_offset + rows)."""

    dim: int
    start: int
    size: int
    row_offset: int
    rows: int


class QuantMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module) -> None:
        """Register the layer's `weight` parameter (the name checkpoints load into).
        The layer has `input_size` and `output_size` (this rank's)."""

    @abstractmethod
    def load(self, layer: nn.Module, param: nn.Parameter, loaded, place: Placement) -> None:
        """Take this rank's piece of one checkpoint tensor; ValueError on a shape mismatch."""

    def finalize(self, layer: nn.Module) -> None:
        """Called once after every tensor was loaded."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias), returned in x's dtype."""

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """W[ids]: rows of the weight as an embedding table."""
        raise NotImplementedError(f"{type(self).__name__} has no embedding lookup")


def copy_piece(param: torch.Tensor, loaded: torch.Tensor, place: Placement) -> None:
    """Copy `place`'s piece of a dense checkpoint tensor into its rows of `param` (cast to
    the parameter's dtype); ValueError if the shapes disagree."""
    piece = loaded.narrow(place.dim, place.start, place.size)
    target = param.data.narrow(0, place.row_offset, place.rows)
    if target.shape != piece.shape:
        raise ValueError(f"shape mismatch: parameter slice {tuple(target.shape)}, checkpoint piece "
                         f"{tuple(piece.shape)} of {tuple(loaded.shape)}")
    target.copy_(piece)


class UnquantizedMethod(QuantMethod):
    """A dense weight in the model dtype (the dtype that is default while the layer is built)."""

    def create_weights(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size), requires_grad=False)

    def load(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, place: Placement) -> None:
        copy_piece(param, loaded, place)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


class QuantConfig(ABC):
    """Picks the QuantMethod of each layer of a model (one per checkpoint format)."""

    name: str

    @abstractmethod
    def method(self, layer_kind: str) -> QuantMethod:
        """layer_kind: "linear", "embedding" or "lm_head"."""
