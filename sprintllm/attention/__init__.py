"""Attention over the paged KV cache, behind one small interface.

The cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`;
token slot `s` lives at block `s // block_size`, offset `s % block_size`. A layer first stores
the new tokens' K/V with `write_kv_cache`, then calls its backend's `forward`, which reads every
key of the sequence (old and new) back through the block table.

Masking rule, the same as transformers' (`masking_utils.causal_mask_function` and
`sliding_window_overlay`): a query at position i sees key j iff j <= i and, with a sliding
window W, i - j < W.
"""
from __future__ import annotations

from typing import Protocol

import torch

from sprintllm.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend", "write_kv_cache"]


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], already rotated
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...


def write_kv_cache(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; a negative slot means "do not store this token"
) -> None:
    if (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # flatten(0, 1) of the contiguous cache is a view, so index_copy_ writes into the cache itself.
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k)
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v)


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "reference":
        from sprintllm.attention.reference import ReferenceAttention

        return ReferenceAttention()
    if name == "paged":
        from sprintllm.attention.paged import PagedAttention

        return PagedAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose one of: paged, reference")
