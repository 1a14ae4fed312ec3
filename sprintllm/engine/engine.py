"""The engine: add requests, then step — schedule, run the model, sample, post-process."""
from __future__ import annotations

import itertools
from typing import Union

import torch

from sprintllm.config import EngineConfig
from sprintllm.engine.beam_search import BeamSearcher
from sprintllm.engine.block_manager import BlockManager
from sprintllm.engine.model_runner import ModelRunner, kv_cache_block_bytes
from sprintllm.engine.request import Request, RequestStatus
from sprintllm.engine.request_group import RequestGroup
from sprintllm.engine.sampler import Sampler
from sprintllm.engine.scheduler import Scheduler
from sprintllm.models.default_model import default_model_path
from sprintllm.models.loader import kv_cache_spec, load_model, model_max_len
from sprintllm.models.tokenizer import load_tokenizer
from sprintllm.outputs import RequestOutput
from sprintllm.sampling_params import SamplingParams

PromptType = Union[str, dict, list[int]]


class Engine:
    def __init__(self, config: EngineConfig):
        if config.model is None:
            config.model = default_model_path()
        self.config = config
        torch.manual_seed(config.seed)
        model, hf_config = load_model(config.model, config.torch_dtype, config.device, config.attention_backend)
        self.hf_config = hf_config
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer)
        kv_spec = kv_cache_spec(hf_config)
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget(kv_spec)
        # A lone request must always fit in the cache, or preemption could never help it.
        context = min(config.max_model_len or model_max_len(hf_config), model_max_len(hf_config))
        self.max_model_len = min(context, self.num_blocks * config.block_size)
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.runner = ModelRunner(config, model, kv_spec, self.num_blocks)
        self.sampler = Sampler(config.seed)
        self.groups: dict[str, RequestGroup] = {}
        self.beams: dict[str, BeamSearcher] = {}
        self._group_of: dict[str, RequestGroup] = {}  # sequence id -> its group
        self._ids = itertools.count()

    def _blocks_for_budget(self, kv_spec: tuple[int, int, int]) -> int:
        per_block = kv_cache_block_bytes(*kv_spec, self.config.block_size, self.config.torch_dtype)
        return max(1, int(self.config.kv_cache_memory_gb * 2**30) // per_block)

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt is a string, a list of token ids or a dict, not {type(prompt).__name__}")

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        text, token_ids = self.tokenize(prompt)
        self._validate(token_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        first = Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                        eos_token_id=self.eos_token_ids[0] if self.eos_token_ids else None)
        group = RequestGroup(request_id, text, first, self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.groups[request_id] = group
        self._group_of[first.request_id] = group
        if params.use_beam_search:
            self.beams[request_id] = BeamSearcher(group, self.scheduler)
        self.scheduler.add(first)
        return request_id

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.hf_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt is {len(token_ids)} tokens long but the context is {self.max_model_len} tokens "
                f"(max_model_len); it leaves no room to generate"
            )
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.max_num_batched_tokens:
            raise ValueError(
                f"the prompt is {len(token_ids)} tokens long, over max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}, and chunked prefill is off"
            )
        bad_stops = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} lie outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is over max_logprobs={self.config.max_logprobs}")

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (e.g. its client went away)."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for seq in list(group.live):
            group.mark_finished(seq, RequestStatus.FINISHED_ABORTED)
            self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
        self._forget(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the step loop -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the current state of every request it advanced."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        logits, sampled = self.runner.execute(plan)
        for request, num_new in plan.scheduled:
            request.num_computed_tokens += num_new
            self.block_manager.cache_blocks(request, request.num_computed_tokens)
        touched: dict[str, RequestGroup] = {}
        plain_rows = []
        for row, seq in enumerate(sampled):
            group = self._group_of[seq.request_id]
            touched[group.request_id] = group
            if group.is_beam_search:
                self.beams[group.request_id].propose(seq, logits[row])
            else:
                plain_rows.append(row)
        if plain_rows:
            self._sample(logits, sampled, plain_rows)
        outputs = []
        for group in touched.values():
            for seq in group.live:
                self._group_of.setdefault(seq.request_id, group)
            outputs.append(group.output())
            if group.is_finished:
                self.groups.pop(group.request_id, None)
                self._forget(group)
        return outputs

    def _sample(self, logits: torch.Tensor, sampled: list[Request], rows: list[int]) -> None:
        seqs = [sampled[r] for r in rows]
        out = self.sampler(logits[rows], seqs)
        for i, seq in enumerate(seqs):
            group = self._group_of[seq.request_id]
            if group.pending_forks:
                self._fork_samples(group, seq, logits[rows[i]])
            self._append(group, seq, int(out.token_ids[i]), float(out.logprobs[i]), _top(out, i, seq))

    def _fork_samples(self, group: RequestGroup, parent: Request, logits: torch.Tensor) -> None:
        """n/best_of > 1: the prompt ran once; now every extra sample shares its blocks."""
        children = []
        for _ in range(group.pending_forks):
            child = group.fork(parent)
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            self._group_of[child.request_id] = group
            children.append(child)
        group.pending_forks = 0
        out = self.sampler(logits.expand(len(children), -1), children)
        for i, child in enumerate(children):
            self._append(group, child, int(out.token_ids[i]), float(out.logprobs[i]), _top(out, i, child))

    def _append(self, group: RequestGroup, seq: Request, token: int, logprob: float, top) -> None:
        status = group.append_token(seq, token, logprob, top)
        if status is not None:
            group.mark_finished(seq, status)
            self.scheduler.finish(seq, status)

    def _forget(self, group: RequestGroup) -> None:
        self.beams.pop(group.request_id, None)
        for seq_id in group.index:
            self._group_of.pop(seq_id, None)


def _top(out, i: int, seq: Request) -> dict[int, float] | None:
    k = seq.sampling_params.logprobs
    if not k or out.top_logprobs is None:
        return None
    ids, values = out.top_logprobs
    return dict(zip(ids[i, :k].tolist(), values[i, :k].tolist()))


def _eos_token_ids(hf_config, tokenizer) -> list[int]:
    """All ids that end generation: the model's (possibly several) and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for token in source if isinstance(source, (list, tuple)) else [source]:
            if token is not None and token not in ids:
                ids.append(token)
    return ids
