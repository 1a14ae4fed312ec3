"""Linear layers that know their slice of a tensor-parallel group.

Each layer holds only its rank's part of the full weight, and its `weight` parameter carries
a `weight_loader(param, loaded_weight, shard_id=None)` that works out which piece of the
full checkpoint tensor is this rank's and where it goes (a `Placement`); the layer's
QuantMethod (sprintllm.quant.base) stores it: dense, GGUF blocks, ... With tp_size == 1 the
piece is the whole tensor; the same code then serves tensor parallelism unchanged.

- Column parallel: output features split across ranks; no communication.
- Row parallel: input features split; partial outputs are summed with an all-reduce.
- QKV / gate_up: several checkpoint tensors packed into one column-parallel matmul, each
  loaded into its own row range (`shard_id`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sprintllm.quant.base import Placement, QuantMethod, UnquantizedMethod, copy_piece


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Copy a whole, unsplit tensor (norm weights, a row-parallel bias); casts to the param's dtype."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def _place(loaded_weight, dim: int, rank: int, size: int, num_shards: int, row_offset: int, rows: int) -> Placement:
    """Part `rank` of `num_shards` equal parts along `dim`, after checking the full size.
    `loaded_weight` is a tensor or a quantized checkpoint tensor (anything with `.shape`)."""
    if loaded_weight.shape[dim] != size * num_shards:
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded_weight.shape)} should have "
                         f"{size * num_shards} entries along dim {dim}")
    return Placement(dim, rank * size, size, row_offset, rows)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_size: int, tp_rank: int,
                 quant_method: QuantMethod | None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size  # this rank's sizes
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _load(self, param: nn.Parameter, loaded_weight, place: Placement) -> None:
        """Store one placed piece: the weight through the quant method, a bias densely."""
        if param is self.bias:
            copy_piece(param, loaded_weight, place)
        else:
            self.quant_method.load(self, param, loaded_weight, place)

    def process_weights_after_loading(self) -> None:
        self.quant_method.finalize(self)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, tp={self.tp_size}, "
                f"quant={type(self.quant_method).__name__}")


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_size: int = 1, tp_rank: int = 0,
                 quant_method: QuantMethod | None = None):
        super().__init__(input_size, _divide(output_size, tp_size), bias, tp_size, tp_rank, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        size = self.output_size
        self._load(param, loaded_weight, _place(loaded_weight, 0, self.tp_rank, size, self.tp_size, 0, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul, e.g. gate_proj and up_proj (shard ids 0, 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0, quant_method: QuantMethod | None = None):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_size, tp_rank, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id: int | None = None) -> None:
        if shard_id is None:
            raise ValueError("a merged linear layer is loaded one shard (output) at a time")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._load(param, loaded_weight, _place(loaded_weight, 0, self.tp_rank, size, self.tp_size, offset, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output rows are [q heads | k heads | v heads].

    When there are fewer KV heads than ranks, each KV head is replicated on several ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_size: int = 1, tp_rank: int = 0, quant_method: QuantMethod | None = None):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size)
        if num_kv_heads >= tp_size:
            self.num_kv_heads, self.kv_replicas = _divide(num_kv_heads, tp_size), 1
        else:
            self.num_kv_heads, self.kv_replicas = 1, _divide(tp_size, num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, tp_size, tp_rank, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id: str | None = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank, num_shards = 0, q_size, self.tp_rank, self.tp_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank, num_shards = kv_size, self.tp_rank // self.kv_replicas, self.tp_size // self.kv_replicas
        else:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        self._load(param, loaded_weight, _place(loaded_weight, 0, rank, size, num_shards, offset, size))


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_size: int = 1, tp_rank: int = 0,
                 quant_method: QuantMethod | None = None):
        super().__init__(_divide(input_size, tp_size), output_size, bias, tp_size, tp_rank, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if param is self.bias:  # the bias is not split: rank 0 adds it once after the reduction
            default_weight_loader(param, loaded_weight)
            return
        size = self.input_size
        self._load(param, loaded_weight,
                   _place(loaded_weight, 1, self.tp_rank, size, self.tp_size, 0, self.output_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
