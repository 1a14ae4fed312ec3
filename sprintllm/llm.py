"""The Python API, shaped like vLLM's: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Sequence

from sprintllm.config import EngineConfig
from sprintllm.engine.engine import Engine, PromptType
from sprintllm.outputs import RequestOutput
from sprintllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        unknown = set(engine_options) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"unknown engine option(s) {sorted(unknown)}; valid: {EngineConfig.field_names()}")
        self.config = EngineConfig(model=model, **engine_options)
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in the prompts' order."""
        ids = self._add_all(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        with _Progress(len(ids), enabled=use_tqdm and sys.stderr.isatty()) as progress:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        progress.advance()
        return [final[i] for i in ids]

    def stream(self, prompts: PromptType | Sequence[PromptType],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield each request's output every time it grows; the last one has finished=True.

        Requests still running when the caller stops iterating are aborted, freeing their blocks.
        """
        ids = self._add_all(prompts, sampling_params)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            for request_id in pending:
                self.engine.abort(request_id)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.encode_chat(c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode_chat(self, conversation: list[dict]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here, 4.x a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _add_all(self, prompts, sampling_params) -> list[str]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, dataclasses.replace(params)))
        except Exception:
            # One bad prompt rejects the whole call and leaves nothing queued or allocated.
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return ids


class _Progress:
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress

            self._progress = Progress(transient=True)
            self._progress.start()
            self._task = self._progress.add_task("generating", total=self.total)
        return self

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
