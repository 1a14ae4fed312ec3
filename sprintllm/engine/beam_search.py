"""Beam search on shared KV blocks.

A group keeps `best_of` live beams. Each step every live beam proposes its top 2*W next
tokens; the W best continuations survive. A beam chosen k times is forked k-1 times: the
forks share its blocks (the block manager copies the partial last block on write) and a
beam chosen zero times frees its blocks at once. Candidates ending in EOS become finished
hypotheses, ranked by length-normalised log-probability as in HF transformers.
"""
from __future__ import annotations

import torch

from sprintllm.engine.request import Request, RequestStatus
from sprintllm.engine.request_group import RequestGroup
from sprintllm.engine.scheduler import Scheduler


class BeamSearcher:
    def __init__(self, group: RequestGroup, scheduler: Scheduler):
        self.group = group
        self.scheduler = scheduler
        self.width = group.params.best_of
        # Beams that already proposed this step wait here until every live beam has.
        self.candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def propose(self, beam: Request, logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, min(2 * self.width, logprobs.numel()))
        self.candidates[beam.request_id] = (values, ids)
        if all(seq.request_id in self.candidates for seq in self.group.live):
            self._advance()

    def _advance(self) -> None:
        group, params = self.group, self.group.params
        scored = []
        for beam in group.live:
            values, ids = self.candidates[beam.request_id]
            for lp, tok in zip(values.tolist(), ids.tolist()):
                scored.append((beam.cumulative_logprob + lp, beam, tok, lp))
        scored.sort(key=lambda c: c[0], reverse=True)
        self.candidates.clear()

        survivors: list[tuple[Request, int, float]] = []
        for rank, (_, beam, tok, lp) in enumerate(scored):
            ends = tok in group.eos_token_ids and not params.ignore_eos and beam.num_output_tokens + 1 >= params.min_tokens
            if ends:
                if rank < self.width:
                    hypothesis = group.fork(beam)  # no blocks: a finished hypothesis never runs again
                    group.append_token(hypothesis, tok, lp, None)
                    group.mark_finished(hypothesis, RequestStatus.FINISHED_STOPPED)
                continue
            survivors.append((beam, tok, lp))
            if len(survivors) == self.width:
                break
        self._reassign(survivors)
        if self._done():
            for beam in list(group.live):
                self._retire(beam)

    def _reassign(self, survivors: list[tuple[Request, int, float]]) -> None:
        group = self.group
        chosen: dict[str, list[tuple[int, float]]] = {}
        for beam, tok, lp in survivors:
            chosen.setdefault(beam.request_id, []).append((tok, lp))
        for beam in list(group.live):
            picks = chosen.get(beam.request_id)
            if not picks:
                self._retire(beam)
                continue
            # Fork before appending, so every fork starts from the parent's tokens.
            seqs = [beam]
            for _ in picks[1:]:
                child = group.fork(beam)
                self.scheduler.block_manager.fork(beam, child)
                self.scheduler.add_running(child)
                seqs.append(child)
            for seq, (tok, lp) in zip(seqs, picks):
                status = group.append_token(seq, tok, lp, None)
                if status is not None:
                    group.mark_finished(seq, status)
                    self.scheduler.finish(seq, status)

    def _done(self) -> bool:
        """HF's rule: stop once W hypotheses exist and no live beam can beat the worst of them."""
        group = self.group
        if not group.live:
            return True
        if len(group.finished) < self.width:
            return False
        worst = sorted((group.beam_score(s) for s in group.finished), reverse=True)[self.width - 1]
        best_live = max(group.beam_score(s) for s in group.live)
        return worst >= best_live

    def _retire(self, beam: Request) -> None:
        self.group.drop(beam)
        self.scheduler.finish(beam, RequestStatus.FINISHED_ABORTED)
