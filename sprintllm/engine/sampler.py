"""Turn one row of logits per request into one token, each row with its own SamplingParams.

Per row, in order: min_tokens bans -> penalties -> greedy argmax, or temperature ->
top-k / top-p / min-p masks -> a draw from the softmax. Work is vectorised across rows;
the only per-row Python loops read request fields and draw two uniform numbers per
sampled row from that row's generator, which is what makes a seeded request
reproducible whatever else shares its batch.

The filters and penalties are plain functions over per-row tensors so that speculative
decoding (rejection sampling over the same processed distribution) can reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F

from sprintllm.engine.request import Request
from sprintllm.sampling_params import SamplingParams

# Below this temperature, logits / temperature can overflow float32; the distribution is
# an argmax for every practical purpose, so such rows are decoded greedily (as in vLLM).
_GREEDY_BELOW_TEMPERATURE = 1e-5
# Block size of the two-level inverse-CDF draw (see categorical_sample).
_BLOCK = 256


@dataclass
class SamplerOutput:
    """What the sampler chose for each row, with raw log-probabilities.

    Both log-prob fields come from log_softmax of the unprocessed logits (vLLM's default).
    `logprobs` is always filled (the engine keeps cumulative_logprob for every sequence
    and ranks best_of samples by it); `top_logprobs` has k = the largest `logprobs` asked
    for in the batch and is None when no request asked.
    """

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32, log-prob of token_ids[i]
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # (ids [N, k], values [N, k]), descending


# ---------------------------------------------------------------------------------------
# Reusable pieces over per-row tensors. A per-row argument of None means "no row uses it",
# which lets callers skip the work entirely.
# ---------------------------------------------------------------------------------------


def pad_token_ids(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Right-pad token lists into one [N, max_len] int64 tensor."""
    width = max(map(len, seqs), default=0)
    rows = [list(s) + [pad_id] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(seqs), width)


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
    repetition_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return penalised logits (a new tensor; the input is left alone).

    prompt_ids / output_ids: [N, L] int64 padded with vocab_size (see pad_token_ids).
    Repetition (HF/vLLM rule) covers prompt and output: a seen token's positive logit is
    divided by the penalty, a negative one multiplied. Presence and frequency (OpenAI
    rule) cover output only: logit -= presence * [count > 0] + frequency * count.
    Neutral values (1, 0, 0) leave a row bit-for-bit unchanged.

    Only the history positions are touched (gather, compute, scatter): an elementwise
    select over all [N, V] logits mispredicts a branch per token on CPU (~5x a plain pass).
    A repeated id writes the same value each time, so duplicates are harmless.
    """
    vocab = logits.shape[-1]
    work = F.pad(logits, (0, 1))  # a spare column absorbs the padding id
    if repetition_penalty is not None:
        ids = torch.cat([prompt_ids, output_ids], dim=1)
        seen = work.gather(1, ids)
        penalty = repetition_penalty[:, None]
        work.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
    if presence_penalty is not None or frequency_penalty is not None:
        counts = torch.zeros_like(work).scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=work.dtype))
        counts = counts.gather(1, output_ids)
        penalty = torch.zeros_like(counts)
        if frequency_penalty is not None:
            penalty += frequency_penalty[:, None] * counts
        if presence_penalty is not None:
            penalty += presence_penalty[:, None]
        work.scatter_(1, output_ids, work.gather(1, output_ids) - penalty)
    return work[:, :vocab]


def _sorted_candidates(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None):
    """Each row's largest logits, descending: enough to find every top-k / top-p threshold.

    A full sort of a 32k vocabulary costs ~35x a top-k of 50 on CPU, so sort everything
    only when some top-p row has no top-k (its nucleus may reach any token).
    Returns None when no row has an active top-k or top-p.
    """
    vocab = logits.shape[-1]
    need = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    if top_p is not None:
        need = torch.where(top_p < 1, vocab, need)
    if top_k is not None:
        need = torch.where((top_k > 0) & (top_k < vocab), top_k, need)
    k = int(need.max())
    if k == 0:
        return None
    if k == vocab:
        return logits.sort(dim=-1, descending=True).values
    return logits.topk(k, dim=-1).values


def _kth_largest(candidates: torch.Tensor, top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, 1] top-k threshold: the k-th largest logit, -inf where top-k is off."""
    on = (top_k > 0) & (top_k < vocab)
    idx = top_k.clamp(1, candidates.shape[-1]) - 1
    return candidates.gather(-1, idx[:, None]).masked_fill(~on[:, None], float("-inf"))


def _top_p_cutoff(candidates: torch.Tensor, top_p: torch.Tensor, kth: torch.Tensor | None) -> torch.Tensor:
    """[N, 1] top-p threshold: the logit of the last token of the smallest prefix whose
    probability (renormalised after top-k) reaches top_p; -inf where top-p is off.

    The first token always has zero mass before it, so at least one token is kept.
    """
    if kth is not None:
        candidates = candidates.masked_fill(candidates < kth, float("-inf"))
    probs = candidates.softmax(dim=-1)
    mass_before = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))  # exclusive, so monotone
    n_keep = (mass_before < top_p[:, None]).sum(dim=-1, keepdim=True)
    cutoff = candidates.gather(-1, n_keep - 1)
    return cutoff.masked_fill(top_p[:, None] >= 1, float("-inf"))


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Set to -inf the tokens that top-k, then top-p, then min-p drop (a new tensor).

    Per-row [N] tensors; a row disables a filter with top_k <= 0 (or >= V), top_p >= 1,
    min_p == 0. Pass already temperature-scaled logits. Each filter becomes a per-row
    logit threshold and a token survives when its logit is >= every threshold, so tied
    tokens share one fate and the result does not depend on sort order: top-k keeps all
    tokens tied with the k-th, top-p all tokens tied with the last one of the nucleus.
    Min-p (prob < min_p * max prob) is the threshold max_logit + log(min_p); the ratio to
    the max is unchanged by the renormalisation after top-k / top-p.
    """
    vocab = logits.shape[-1]
    thresholds = []
    candidates = _sorted_candidates(logits, top_k, top_p) if top_k is not None or top_p is not None else None
    if candidates is not None:
        kth = _kth_largest(candidates, top_k, vocab) if top_k is not None else None
        if kth is not None:
            thresholds.append(kth)
        if top_p is not None:
            thresholds.append(_top_p_cutoff(candidates, top_p, kth))
    if min_p is not None:
        thresholds.append(logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None])
    if not thresholds:
        return logits
    threshold = reduce(torch.maximum, thresholds)
    return logits.masked_fill(logits < threshold, float("-inf"))


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first weight whose float64 running sum exceeds u * total, per row.

    Zero weights have empty intervals and are never chosen; u < 1 keeps the target below
    the total, so the result is always a valid index.
    """
    cdf = weights.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).squeeze(-1)


def categorical_sample(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(logits); uniforms: [N, 2] float64 in [0, 1).

    Two-level inverse CDF: pick a block of _BLOCK tokens with probability proportional to
    its mass (uniforms[:, 0]), then a token inside it (uniforms[:, 1]). Every token's
    probability is then exact to float32 relative precision, even 1e-9 ones, whereas a
    float32 cumsum over the whole vocabulary is off by up to ~3e-8 absolute per token,
    and a float64 one costs about twice as much on CPU. Masked (-inf) tokens are never drawn.
    Two uniforms per row, rather than V noise values, keep per-row generators cheap.
    """
    rows, vocab = logits.shape
    probs = logits.softmax(dim=-1)
    if vocab % _BLOCK:  # F.pad copies even when there is nothing to add
        probs = F.pad(probs, (0, -vocab % _BLOCK))
    probs = probs.view(rows, -1, _BLOCK)
    block = _inverse_cdf(probs.sum(dim=-1), uniforms[:, 0])
    inside = probs[torch.arange(rows, device=logits.device), block]
    return block * _BLOCK + _inverse_cdf(inside, uniforms[:, 1])


# ---------------------------------------------------------------------------------------
# Reading the per-request settings of a batch.
# ---------------------------------------------------------------------------------------


def _is_greedy(params: SamplingParams) -> bool:
    return params.greedy or params.temperature < _GREEDY_BELOW_TEMPERATURE


def _uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


def _min_tokens_bans(request: Request) -> list[int]:
    """Token ids that may not be produced yet because the output is shorter than min_tokens."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    eos = [] if request.eos_token_id is None else [request.eos_token_id]
    return list(params.stop_token_ids) + eos


def _is_plain_greedy(requests: list[Request]) -> bool:
    """True when the tokens are one argmax of the raw logits: no penalties and no bans."""
    return all(
        _is_greedy(r.sampling_params) and not _uses_penalties(r.sampling_params) and not _min_tokens_bans(r)
        for r in requests
    )


def _row_tensor(values: list, off, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Per-row parameter tensor, or None when every row has the feature switched off."""
    if all(off(v) for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device)


def _ban_min_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows, cols = [], []
    for i, request in enumerate(requests):
        bans = _min_tokens_bans(request)
        rows += [i] * len(bans)
        cols += bans
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def _penalise(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    params = [r.sampling_params for r in requests]
    used = [_uses_penalties(p) for p in params]
    if not any(used):
        return logits
    device, vocab = logits.device, logits.shape[-1]
    # Rows without a penalty get empty histories, so they cost nothing to scatter.
    prompts = [r.prompt_token_ids if u and p.repetition_penalty != 1 else [] for r, p, u in zip(requests, params, used)]
    outputs = [r.output_token_ids if u else [] for r, u in zip(requests, used)]
    return apply_penalties(
        logits,
        pad_token_ids(prompts, vocab, device),
        pad_token_ids(outputs, vocab, device),
        _row_tensor([p.repetition_penalty for p in params], lambda v: v == 1, torch.float32, device),
        _row_tensor([p.presence_penalty for p in params], lambda v: v == 0, torch.float32, device),
        _row_tensor([p.frequency_penalty for p in params], lambda v: v == 0, torch.float32, device),
    )


def _raw_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]):
    """Sampled-token log-probs of the unprocessed logits, and top-k ones if any row asked.

    log_softmax is one fused kernel; logit - logsumexp looks cheaper but takes ~2x longer
    on CPU.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    sampled = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
    asked = [p.logprobs for p in params if p.logprobs is not None]
    if not asked:
        return sampled, None
    values, ids = logprobs.topk(min(max(asked), logprobs.shape[-1]), dim=-1)
    return sampled, (ids, values)


class Sampler:
    """Chooses the next token of every request in a batch (see the module docstring).

    Request generators, and the default one used by rows without a seed, are CPU
    torch.Generators: each sampled row draws exactly two float64 uniforms from its own
    generator per step, so a seeded request's tokens do not depend on batch company,
    row position or device.
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        if _is_plain_greedy(requests):  # the usual decode step: nothing to process
            token_ids = logits.argmax(dim=-1)
        else:
            processed = _penalise(_ban_min_tokens(logits.float(), requests), requests)
            token_ids = self._choose(processed, requests)
        logprobs, top_logprobs = _raw_logprobs(logits, token_ids, [r.sampling_params for r in requests])
        return SamplerOutput(token_ids, logprobs, top_logprobs)

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Argmax for greedy rows, a draw for the others (computed only on those rows)."""
        rows = [i for i, r in enumerate(requests) if not _is_greedy(r.sampling_params)]
        if len(rows) == len(requests):
            return self._sample(logits, requests)
        token_ids = logits.argmax(dim=-1)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            token_ids[index] = self._sample(logits[index], [requests[i] for i in rows])
        return token_ids

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        device, vocab = logits.device, logits.shape[-1]
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        logits = apply_top_k_top_p_min_p(
            logits / temperature[:, None],
            _row_tensor([p.top_k for p in params], lambda k: k <= 0 or k >= vocab, torch.long, device),
            _row_tensor([p.top_p for p in params], lambda p: p >= 1, torch.float32, device),
            _row_tensor([p.min_p for p in params], lambda p: p == 0, torch.float32, device),
        )
        uniforms = torch.stack([
            torch.rand(2, dtype=torch.float64, generator=r.generator or self.generator) for r in requests
        ])
        return categorical_sample(logits, uniforms.to(device))
