"""Linear layers that know their slice of a tensor-parallel group.

Each layer holds only its rank's part of the full weight, and each parameter carries a
`weight_loader(param, loaded_weight, shard_id=None)` that cuts that part out of the full
checkpoint tensor. With tp_size == 1 the slice is the whole tensor; the same code then
serves tensor parallelism unchanged.

- Column parallel: output features split across ranks; no communication.
- Row parallel: input features split; partial outputs are summed with an all-reduce.
- QKV / gate_up: several checkpoint tensors packed into one column-parallel matmul, each
  loaded into its own row range (`shard_id`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Copy a whole, unsplit tensor (norm weights, a row-parallel bias); casts to the param's dtype."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def _shard(loaded_weight: torch.Tensor, dim: int, rank: int, size: int, num_shards: int) -> torch.Tensor:
    """Part `rank` of `num_shards` equal parts along `dim`, after checking the full size."""
    if loaded_weight.shape[dim] != size * num_shards:
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded_weight.shape)} should have "
                         f"{size * num_shards} entries along dim {dim}")
    return loaded_weight.narrow(dim, rank * size, size)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_size: int, tp_rank: int):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size  # this rank's sizes
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, tp={self.tp_size}"


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_size: int = 1, tp_rank: int = 0):
        super().__init__(input_size, _divide(output_size, tp_size), bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        default_weight_loader(param, _shard(loaded_weight, 0, self.tp_rank, size, self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul, e.g. gate_proj and up_proj (shard ids 0, 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:
            raise ValueError("a merged linear layer is loaded one shard (output) at a time")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        shard = _shard(loaded_weight, 0, self.tp_rank, size, self.tp_size)
        default_weight_loader(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output rows are [q heads | k heads | v heads].

    When there are fewer KV heads than ranks, each KV head is replicated on several ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_size: int = 1, tp_rank: int = 0):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size)
        if num_kv_heads >= tp_size:
            self.num_kv_heads, self.kv_replicas = _divide(num_kv_heads, tp_size), 1
        else:
            self.num_kv_heads, self.kv_replicas = 1, _divide(tp_size, num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank, num_shards = 0, q_size, self.tp_rank, self.tp_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank, num_shards = kv_size, self.tp_rank // self.kv_replicas, self.tp_size // self.kv_replicas
        else:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        shard = _shard(loaded_weight, 0, rank, size, num_shards)
        default_weight_loader(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_size: int = 1, tp_rank: int = 0):
        super().__init__(_divide(input_size, tp_size), output_size, bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is not split: rank 0 adds it once after the reduction
            default_weight_loader(param, loaded_weight)
            return
        size = param.shape[1]
        default_weight_loader(param, _shard(loaded_weight, 1, self.tp_rank, size, self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
