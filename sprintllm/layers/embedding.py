"""Token embedding and LM head, split along the vocabulary across tensor-parallel ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        if num_embeddings % tp_size:
            raise ValueError(f"vocab size {num_embeddings} is not divisible by tensor parallel size {tp_size}")
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.num_embeddings = num_embeddings
        self.shard_size = num_embeddings // tp_size
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.shape[0] != self.num_embeddings or loaded_weight.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape mismatch: parameter {(self.num_embeddings, *param.shape[1:])}, "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight.narrow(0, self.vocab_start, self.shard_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Each rank embeds the ids in its own vocab range and zeros the rest; the sum is the lookup.
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mine[:, None]
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary. With tied embeddings the model points `weight`
    at the embedding's parameter, so the two share one tensor."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(shards, logits)
        return torch.cat(shards, dim=-1)
