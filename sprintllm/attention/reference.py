"""The oracle backend: one sequence at a time, dense K/V, explicit float32 masked softmax.

Slow and obvious on purpose; the other backends are tested against it.
"""
from __future__ import annotations

import torch

from sprintllm.attention.metadata import AttentionMetadata


class ReferenceAttention:
    name = "reference"

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        block_size = k_cache.shape[1]
        group = q.shape[1] // k_cache.shape[2]
        start = 0
        for b, (query_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            num_blocks = -(-seq_len // block_size)
            blocks = meta.block_tables[b, :num_blocks].long()
            k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
            v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)

            q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            visible = k_pos <= q_pos
            if sliding_window is not None:
                visible &= q_pos - k_pos < sliding_window

            qb = q[start:start + query_len].float()
            scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
            probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out[start:start + query_len] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
            start += query_len
        return out
