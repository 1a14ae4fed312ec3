"""One user request and the sequences that answer it (n samples, best_of, or beams)."""
from __future__ import annotations

import time

import torch

from sprintllm.engine.detokenizer import IncrementalDetokenizer
from sprintllm.engine.request import Request, RequestStatus
from sprintllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sprintllm.sampling_params import SamplingParams


_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive multiples land far apart


class RequestGroup:
    def __init__(self, request_id: str, prompt: str | None, first: Request, tokenizer, eos_token_ids: list[int],
                 max_model_len: int):
        self.request_id = request_id
        self.prompt = prompt
        self.params: SamplingParams = first.sampling_params
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.live: list[Request] = [first]
        self.finished: list[Request] = []
        self.detokenizers = {first.request_id: self._new_detokenizer(first)}
        self.index = {first.request_id: 0}
        self.num_forks = 0
        # Sampled (non-beam) groups of n/best_of > 1 fork after the prompt's first logits.
        self.pending_forks = 0 if self.params.use_beam_search else self.params.best_of - 1
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def _new_detokenizer(self, request: Request) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, self.params.skip_special_tokens)

    @property
    def is_finished(self) -> bool:
        return not self.live

    @property
    def is_beam_search(self) -> bool:
        return self.params.use_beam_search

    def fork(self, parent: Request) -> Request:
        """A new sequence continuing `parent`; seeded requests give each sample its own stream."""
        self.num_forks += 1
        child_id = f"{self.request_id}#{self.num_forks}"
        generator = None
        if self.params.seed is not None:
            # Spread sibling streams far apart so request seeds s and s+1 do not share samples.
            generator = torch.Generator().manual_seed((self.params.seed + self.num_forks * _GOLDEN) % 2**64)
        child = parent.fork(child_id, generator)
        self.detokenizers[child_id] = self.detokenizers[parent.request_id].fork()
        self.index[child_id] = len(self.index)
        self.live.append(child)
        return child

    def append_token(self, seq: Request, token_id: int, logprob: float,
                     top_logprobs: dict[int, float] | None) -> RequestStatus | None:
        """Record one generated token; return the finish status if the sequence is done."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        seq.append_token(token_id)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            entry = dict(top_logprobs or {})
            entry[token_id] = logprob
            seq.logprobs.append(entry)
        self.detokenizers[seq.request_id].add(token_id)
        return self._check_stop(seq, token_id)

    def _check_stop(self, seq: Request, token_id: int) -> RequestStatus | None:
        params = self.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if params.stop and self._truncate_at_stop_string(seq):
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if seq.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _truncate_at_stop_string(self, seq: Request) -> bool:
        detok = self.detokenizers[seq.request_id]
        for stop in self.params.stop:
            # Only the newest text can complete a stop string; search just its tail.
            start = max(0, len(detok.text) - len(stop) - 32)
            pos = detok.text.find(stop, start)
            if pos >= 0:
                end = pos + len(stop) if self.params.include_stop_str_in_output else pos
                detok.text = detok.text[:end]
                seq.stop_reason = stop
                return True
        return False

    def mark_finished(self, seq: Request, status: RequestStatus) -> None:
        seq.status = status
        if seq in self.live:
            self.live.remove(seq)
        self.finished.append(seq)
        if not self.live:
            self.finished_time = time.monotonic()

    def drop(self, seq: Request) -> None:
        """Forget a beam that lost; it is not an answer."""
        self.live.remove(seq)

    def output(self) -> RequestOutput:
        seqs = self._answer_seqs()
        first = seqs[0] if seqs else self.finished[0]
        outputs = [self._completion(i, seq) for i, seq in enumerate(seqs)]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outputs,
            finished=self.is_finished,
            metrics=RequestMetrics(
                arrival_time=first.arrival_time,
                first_token_time=self.first_token_time,
                finished_time=self.finished_time,
                num_cached_tokens=first.num_cached_tokens,
                num_preemptions=sum(s.num_preemptions for s in self.live + self.finished),
            ),
        )

    def _answer_seqs(self) -> list[Request]:
        n = self.params.n
        if self.is_beam_search:
            pool = self.finished if self.is_finished else self.live
            return sorted(pool, key=self.beam_score, reverse=True)[:n]
        seqs = sorted(self.live + self.finished, key=lambda s: self.index[s.request_id])
        if self.is_finished and self.params.best_of > n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        return seqs[:n]

    def beam_score(self, seq: Request) -> float:
        """Length-normalised log-probability, as HF's beam search ranks hypotheses."""
        return seq.cumulative_logprob / max(1, seq.num_output_tokens) ** self.params.length_penalty

    def _completion(self, index: int, seq: Request) -> CompletionOutput:
        status = seq.status
        return CompletionOutput(
            index=index,
            text=self.detokenizers[seq.request_id].text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
            finish_reason=status.value if status.finished else None,
            stop_reason=seq.stop_reason,
        )
