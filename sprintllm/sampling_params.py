"""Per-request sampling settings, validated on construction."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

_INT_FIELDS = ("n", "best_of", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("max_tokens", "logprobs", "seed")
_REAL_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "length_penalty")
# torch.Generator.manual_seed accepts exactly this range.
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (names follow vLLM's SamplingParams).

    top_k in (-1, 0), top_p == 1 and min_p == 0 disable those filters. `seed` makes the
    request reproducible on its own, whatever else shares its batch.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, value, rule: str) -> None:
            raise ValueError(f"invalid sampling parameter {name}={value!r}: {rule}")

        # Types first: NaN passes every comparison below, a str or float count fails later
        # and far from here.
        for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) and not (value is None and name in _OPTIONAL_INT_FIELDS):
                bad(name, value, "must be an integer")
        for name in _REAL_FIELDS:
            if not _is_finite_real(getattr(self, name)):
                bad(name, getattr(self, name), "must be a finite number")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "must be non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "must be non-negative token ids")
        if self.seed is not None and not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]:
            bad("seed", self.seed, f"must be in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}]")
        if self.n < 1:
            bad("n", self.n, "must be >= 1")
        if self.best_of < self.n:
            bad("best_of", self.best_of, f"must be >= n ({self.n})")
        if self.temperature < 0:
            bad("temperature", self.temperature, "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < -1:
            bad("top_k", self.top_k, "must be -1 or 0 (disabled) or >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", self.min_tokens, "must be in [0, max_tokens]")
        if self.logprobs is not None and self.logprobs < 0:
            bad("logprobs", self.logprobs, "must be >= 0")
        if self.use_beam_search and self.temperature not in (0.0, 1.0):
            bad("temperature", self.temperature, "beam search is deterministic; leave it at 0 or unset")
        if self.length_penalty != 1.0 and not self.use_beam_search:
            bad("length_penalty", self.length_penalty, "only applies with use_beam_search=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
