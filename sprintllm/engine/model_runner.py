"""Turns a scheduler plan into one flattened ragged batch and runs the model on it."""
from __future__ import annotations

import torch

from sprintllm.attention.metadata import AttentionMetadata
from sprintllm.config import EngineConfig
from sprintllm.engine.request import Request
from sprintllm.engine.scheduler import SchedulerOutput


def kv_cache_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers, K and V together."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, kv_spec: tuple[int, int, int], num_blocks: int):
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        num_layers, num_kv_heads, head_dim = kv_spec
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        # One preallocated K and V tensor per layer; blocks are the first dimension.
        self.kv_caches = [
            (torch.zeros(shape, dtype=config.torch_dtype, device=self.device),
             torch.zeros(shape, dtype=config.torch_dtype, device=self.device))
            for _ in range(num_layers)
        ]
        self.native_decode_off_reason: str | None = "turned off (native_decode=False)"
        if config.native_decode:
            bind = getattr(model, "bind_native_decoder", None)
            self.native_decode_off_reason = (bind(self.kv_caches, self.block_size) if bind is not None
                                             else f"{type(model).__name__} has no native decoder")

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def prepare(self, plan: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the plan: token ids, positions, attention metadata, and the batch rows
        whose logits are needed (the last token of every sequence that reaches its end)."""
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        for request, num_new in plan.scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            token_ids.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            query_lens.append(num_new)
            seq_lens.append(end)
            if end == request.num_tokens:
                logit_rows.append(len(token_ids) - 1)
        max_blocks = max(len(r.block_table) for r, _ in plan.scheduled)
        block_tables = torch.tensor(
            [r.block_table + [0] * (max_blocks - len(r.block_table)) for r, _ in plan.scheduled], dtype=torch.int32
        )
        positions_t = torch.tensor(positions, dtype=torch.int64)
        seq_index = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
        blocks = block_tables[seq_index, positions_t // self.block_size].to(torch.int64)
        slot_mapping = blocks * self.block_size + positions_t % self.block_size
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.cumsum(torch.tensor(query_lens), 0)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device),
            query_start_loc=query_start_loc.to(self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=block_tables.to(self.device),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            block_size=self.block_size,
        )
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        return input_ids, positions_t.to(self.device), meta, logit_rows

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        """Run one step. Returns logits [N, V] (float32) and the N requests they belong to."""
        self.copy_blocks(plan.block_copies)
        input_ids, positions, meta, logit_rows = self.prepare(plan)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampled = [r for r, n in plan.scheduled if r.num_computed_tokens + n == r.num_tokens]
        if not logit_rows:
            return torch.empty(0), sampled
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=hidden.device)])
        return logits.float(), sampled
