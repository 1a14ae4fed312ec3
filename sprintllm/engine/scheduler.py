"""Continuous-batching scheduler: one rule for prefill, decode, chunks and recompute.

Every step each running request gets up to `num_tokens - num_computed_tokens` tokens
within the step's token budget; waiting requests are admitted while blocks, the token
budget and the sequence budget allow. There is no separate prefill or decode phase.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sprintllm.config import EngineConfig
from sprintllm.engine.block_manager import BlockManager
from sprintllm.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """This step's plan: which requests run and how many new tokens each computes."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._steps_since_admission = 0
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if self._may_admit(out):
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            copies = self.block_manager.allocate_slots(request, num_new)
            while copies is None:
                # Out of blocks: recompute the newest request later rather than crash.
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
                copies = self.block_manager.allocate_slots(request, num_new)
            if copies is None:
                break
            out.scheduled.append((request, num_new))
            out.block_copies.extend(copies)
            budget -= num_new
            i += 1
        return budget

    def _may_admit(self, out: SchedulerOutput) -> bool:
        if not self.waiting or out.preempted:
            return False
        # The prefill/decode balance knob: while decodes run, let waiting prompts in only
        # every `prefill_interval` steps so running streams are not stalled by each arrival.
        self._steps_since_admission += 1
        if self.running and self._steps_since_admission < self.config.prefill_interval:
            return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        admitted = False
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_cached = self.block_manager.get_computed_blocks(request)
            remaining = request.num_tokens - request.num_computed_tokens - num_cached
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            copies = self.block_manager.allocate_slots(request, num_new, computed_blocks)
            if copies is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens += num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            out.block_copies.extend(copies)
            budget -= num_new
            admitted = True
        if admitted:
            self._steps_since_admission = 0

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, budget)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
        out.scheduled[:] = [(r, n) for r, n in out.scheduled if r is not request]

    def add_running(self, request: Request) -> None:
        """Join a request that already holds blocks (a fork for n>1 or beam search)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks at once."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
