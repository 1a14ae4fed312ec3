"""Token embedding and LM head, split along the vocabulary across tensor-parallel ranks.

Both store their table through a QuantMethod (dense, or GGUF blocks as in the file), whose
rows are this rank's vocabulary entries: the embedding looks rows up, the head multiplies
by them. A tied head borrows the embedding's table instead of holding its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sprintllm.quant.base import Placement, QuantMethod, UnquantizedMethod


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_size: int = 1, tp_rank: int = 0,
                 quant_method: QuantMethod | None = None):
        super().__init__()
        if num_embeddings % tp_size:
            raise ValueError(f"vocab size {num_embeddings} is not divisible by tensor parallel size {tp_size}")
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.num_embeddings = num_embeddings
        self.shard_size = num_embeddings // tp_size
        self.vocab_start = tp_rank * self.shard_size
        # The quant method's view of the table: a [vocab shard, embedding_dim] weight.
        self.input_size, self.output_size = embedding_dim, self.shard_size
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.input_size):
            raise ValueError(f"shape mismatch: parameter {(self.num_embeddings, self.input_size)}, "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        place = Placement(0, self.vocab_start, self.shard_size, 0, self.shard_size)
        self.quant_method.load(self, param, loaded_weight, place)

    def process_weights_after_loading(self) -> None:
        self.quant_method.finalize(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.embed(self, input_ids)
        # Each rank embeds the ids in its own vocab range and zeros the rest; the sum is the lookup.
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = self.quant_method.embed(self, local.clamp(0, self.shard_size - 1)) * mine[:, None]
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary."""

    tied: VocabParallelEmbedding | None = None

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Use the embedding's table (tied word embeddings): no weight of its own. A plain
        attribute, not a submodule: the embedding is registered (and loaded) where it lives."""
        del self.weight
        self.__dict__["tied"] = embedding

    def process_weights_after_loading(self) -> None:
        if self.tied is None:  # a tied table is finalized by its embedding
            super().process_weights_after_loading()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        table = self.tied if self.tied is not None else self
        logits = table.quant_method.apply(table, hidden)
        if self.tp_size == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(shards, logits)
        return torch.cat(shards, dim=-1)
