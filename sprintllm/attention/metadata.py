"""What an attention layer needs to know about the flattened ragged batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One step's batch: B sequences, T tokens in all, laid end to end.

    Sequence b owns tokens query_start_loc[b]:query_start_loc[b+1] of the batch. Those are
    its positions seq_lens[b]-query_lens[b] .. seq_lens[b]-1; everything before them is
    already in the paged cache (computed earlier or found in the prefix cache).
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) each token's K/V go to
    query_start_loc: torch.Tensor  # [B+1] int32 cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens_list: list[int]  # the same facts as Python ints, for loops over sequences
    seq_lens_list: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
