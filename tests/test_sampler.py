import math

import pytest
import torch

from sprintllm.engine.request import Request
from sprintllm.engine.sampler import (
    Sampler,
    apply_penalties,
    apply_top_k_top_p_min_p,
    categorical_sample,
    pad_token_ids,
)
from sprintllm.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_request(prompt=(1, 2, 3), output=(), eos=None, request_id="r", **params) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(**params), eos_token_id=eos)
    for token in output:
        request.append_token(token)
    return request


def log_probs(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def kept(masked: torch.Tensor) -> list[list[bool]]:
    return (masked > NEG_INF).tolist()


def per_row(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --- masks ---------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest_and_everything_tied_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]] + [[3.0, 2.0, 2.0, 1.0, 0.0]] * 5)
    top_k = per_row([2, 2, 4, -1, 0, 10], torch.long)
    masked = apply_top_k_top_p_min_p(logits, top_k=top_k)
    assert kept(masked) == [
        [False, True, True, False, False],
        [True, True, True, False, False],  # k=2 but the 2nd and 3rd tie
        [True, True, True, True, False],
        [True] * 5,  # -1: off
        [True] * 5,  # 0: off
        [True] * 5,  # k > V: everything
    ]
    survivors = masked > NEG_INF
    assert torch.equal(masked[survivors], logits[survivors])


def test_top_p_keeps_the_smallest_nucleus_reaching_top_p():
    probs = [0.15, 0.5, 0.05, 0.3]
    logits = torch.cat([
        log_probs(*[probs] * 5),
        log_probs([0.3, 0.3, 0.2, 0.2]),
        log_probs([0.4, 0.2, 0.2, 0.2]),
    ])
    top_p = per_row([0.7, 0.85, 0.1, 1e-6, 1.0, 0.25, 0.5])
    assert kept(apply_top_k_top_p_min_p(logits, top_p=top_p)) == [
        [False, True, False, True],  # 0.5 < 0.7 <= 0.5 + 0.3
        [True, True, False, True],
        [False, True, False, False],
        [False, True, False, False],  # the most likely token always survives
        [True, True, True, True],
        [True, True, False, False],  # a tie with the nucleus' last token is kept
        [True, True, True, True],
    ]


def test_min_p_drops_tokens_below_min_p_times_the_top_probability():
    logits = log_probs(*[[0.15, 0.5, 0.05, 0.3]] * 4)
    masked = apply_top_k_top_p_min_p(logits, min_p=per_row([0.2, 0.5, 0.0, 1.0]))
    assert kept(masked) == [
        [True, True, False, True],
        [False, True, False, True],
        [True, True, True, True],
        [False, True, False, False],
    ]


def test_top_p_uses_the_distribution_renormalised_after_top_k_then_min_p():
    logits = log_probs(*[[0.1, 0.4, 0.2, 0.3]] * 4)
    masked = apply_top_k_top_p_min_p(
        logits,
        top_k=per_row([3, -1, 3, -1], torch.long),
        top_p=per_row([0.75, 0.75, 1.0, 1.0]),
        min_p=per_row([0.0, 0.0, 0.6, 0.0]),
    )
    assert kept(masked) == [
        [False, True, False, True],  # after top-3: 0.44, 0.33, 0.22 -> 0.44 + 0.33 >= 0.75
        [False, True, True, True],  # without top-k: 0.4 + 0.3 < 0.75
        [False, True, False, True],  # top-3 then min-p 0.6 * 0.4 = 0.24
        [True, True, True, True],
    ]


def _reference_filter(row: list[float], top_k: int, top_p: float, min_p: float) -> list[bool]:
    """Per-row plain-Python definition of the three filters (distinct values assumed)."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = set(order[:top_k] if 0 < top_k < len(row) else order)
    weights = {i: math.exp(row[i] - row[order[0]]) for i in keep}
    total, mass = sum(weights.values()), 0.0
    nucleus = set()
    for i in order:
        if i in keep and (mass < top_p or top_p >= 1):
            nucleus.add(i)
            mass += weights[i] / total
    return [i in nucleus and math.exp(row[i] - row[order[0]]) >= min_p for i in range(len(row))]


def test_filters_match_a_per_row_reference_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 48, 300
    logits = torch.randn(rows, vocab, generator=gen) * 3
    top_k = torch.randint(-1, 60, (rows,), generator=gen)
    top_p = torch.rand(rows, generator=gen) * 0.9 + 0.1
    min_p = torch.where(torch.rand(rows, generator=gen) < 0.5, 0.0, torch.rand(rows, generator=gen) * 0.2)
    top_p[::4] = 1.0
    masked = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for i in range(rows):
        expected = _reference_filter(logits[i].tolist(), int(top_k[i]), float(top_p[i]), float(min_p[i]))
        assert kept(masked[i:i + 1])[0] == expected, f"row {i}"


def test_no_filter_returns_logits_unchanged():
    logits = torch.randn(3, 7)
    off = apply_top_k_top_p_min_p(logits, per_row([-1, 0, 7], torch.long), per_row([1.0] * 3), per_row([0.0] * 3))
    assert torch.equal(off, logits)


# --- penalties -----------------------------------------------------------------------------


def test_apply_penalties_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]] * 5)
    vocab = logits.shape[-1]
    prompt = pad_token_ids([[0, 1], [0, 1], [3], [1], []], vocab)
    output = pad_token_ids([[1, 2, 2], [1, 2, 2], [4], [0, 0], []], vocab)
    out = apply_penalties(
        logits, prompt, output,
        repetition_penalty=per_row([2.0, 1.0, 1.5, 1.0, 2.0]),
        presence_penalty=per_row([0.5, 0.0, 0.0, -0.5, 1.0]),
        frequency_penalty=per_row([0.25, 0.0, 0.0, 0.0, 1.0]),
    )
    assert out.tolist() == [
        # token 0 is only in the prompt: repetition only (2 / 2);
        # token 1: -1 * 2 - 0.25 * 1 - 0.5; token 2: 0.5 / 2 - 0.25 * 2 - 0.5
        [1.0, -2.75, -0.75, 3.0, -2.0],
        [2.0, -1.0, 0.5, 3.0, -2.0],  # neutral penalties: unchanged
        [2.0, -1.0, 0.5, 2.0, -3.0],  # repetition only: 3 / 1.5, -2 * 1.5
        [2.5, -1.0, 0.5, 3.0, -2.0],  # negative presence rewards output token 0 once
        [2.0, -1.0, 0.5, 3.0, -2.0],  # no history yet: only padding, nothing to penalise
    ]
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # input untouched


def test_expanded_logits_with_bans_and_penalties():
    """The engine samples n>1 forks from one row via logits.expand(n, -1)."""
    row = torch.tensor([5.0, 1.0, 0.5, 0.0])
    requests = [make_request(eos=0, min_tokens=1, temperature=0.0, repetition_penalty=4.0, prompt=[1]),
                make_request(temperature=0.0, frequency_penalty=1.0, output=[0, 0])]
    out = Sampler()(row.expand(2, -1), requests)
    assert out.token_ids.tolist() == [2, 0]  # eos banned, 1 / 4 < 0.5; 5 - 2 > 1
    assert row.tolist() == [5.0, 1.0, 0.5, 0.0]


def test_sampler_applies_penalties_before_greedy_argmax():
    logits = torch.tensor([[3.0, 2.9, 0.0]] * 3)
    requests = [
        make_request(prompt=[0], temperature=0.0, repetition_penalty=2.0),  # 3 / 2 < 2.9
        make_request(prompt=[5], output=[0, 0], temperature=0.0, frequency_penalty=0.1),  # 2.8 < 2.9
        make_request(prompt=[0], output=[0], temperature=0.0),
    ]
    assert Sampler()(logits, requests).token_ids.tolist() == [1, 1, 0]


# --- min_tokens, greedy --------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.tensor([[1.0, 0.0, 0.0, 4.0, 5.0]] * 4)
    common = dict(eos=4, temperature=0.0, stop_token_ids=[3], min_tokens=2)
    requests = [
        make_request(output=[], **common),
        make_request(output=[1], ignore_eos=True, **common),
        make_request(output=[1, 1], **common),
        make_request(output=[], eos=4, temperature=0.0),
    ]
    out = Sampler()(logits, requests)
    assert out.token_ids.tolist() == [0, 0, 4, 4]
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, raw[torch.arange(4), out.token_ids])  # raw, not masked


def test_min_tokens_holds_for_sampled_rows():
    logits = torch.tensor([[0.0, 0.0, 9.0, 9.0]]).expand(200, -1)
    requests = [make_request(output=[], eos=3, stop_token_ids=[2], min_tokens=1, request_id=str(i)) for i in range(200)]
    tokens = Sampler(seed=1)(logits, requests).token_ids
    assert set(tokens.tolist()) == {0, 1}


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 2.9], [0.0, 0.0, 1.0], [0.0, 0.5, 0.4]])
    requests = [
        make_request(temperature=0.0),
        make_request(temperature=1.5, top_k=1),
        make_request(temperature=1e-7),  # below float32-safe scaling: greedy
        make_request(temperature=1.0, seed=3),
    ]
    tokens = Sampler()(logits, requests).token_ids.tolist()
    assert tokens[:3] == [1, 0, 2]
    assert tokens[3] in (0, 1, 2)


def test_all_greedy_batch_is_one_argmax_plus_the_logprob_pass():
    logits = torch.randn(64, 1000)
    requests = [make_request(temperature=0.0, request_id=str(i)) for i in range(64)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = Sampler()(logits, requests)
    ops = {event.key: event.count for event in prof.key_averages()}
    assert ops.get("aten::argmax") == 1 and ops.get("aten::_log_softmax") == 1
    processing = {"aten::sort", "aten::topk", "aten::_softmax", "aten::clone", "aten::index_put",
                  "aten::where", "aten::masked_fill", "aten::scatter_", "aten::div", "aten::cumsum"}
    assert not processing & ops.keys(), sorted(ops)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.allclose(out.logprobs, logits.log_softmax(-1).max(-1).values)
    assert out.top_logprobs is None


# --- seeds and reproducibility -------------------------------------------------------------


def _step_logits(name: str, step: int, vocab: int) -> torch.Tensor:
    """The logits a fake model gives request `name` at `step` (independent of the batch)."""
    seed = 1000 * sum(map(ord, name)) + step
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _run(batch: list[Request], sampler: Sampler, steps: int, vocab: int) -> dict[str, list[int]]:
    for step in range(steps):
        logits = torch.stack([_step_logits(r.request_id, step, vocab) for r in batch])
        tokens = sampler(logits, batch).token_ids.tolist()
        for request, token in zip(batch, tokens):
            request.append_token(token)
    return {r.request_id: r.output_token_ids for r in batch}


SEEDED = dict(seed=1234, temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, presence_penalty=0.2)


def test_seeded_request_is_reproducible_whatever_its_batch():
    vocab, steps = 200, 20
    alone = _run([make_request(request_id="a", **SEEDED)], Sampler(seed=0), steps, vocab)["a"]
    batch = [
        make_request(request_id="b", temperature=1.0),
        make_request(request_id="c", seed=7, top_p=0.5),  # top-p without top-k: full sort path
        make_request(request_id="a", **SEEDED),
        make_request(request_id="d", temperature=0.0, logprobs=2),
        make_request(request_id="e", top_k=120, min_p=0.05),
    ]
    in_batch = _run(batch, Sampler(seed=99), steps, vocab)["a"]
    assert in_batch == alone
    assert len(set(alone)) > 5  # it really sampled


def test_different_seeds_give_different_sequences():
    vocab, steps = 1000, 20
    runs = [
        _run([make_request(request_id="x", seed=seed, temperature=1.0)], Sampler(), steps, vocab)["x"]
        for seed in (1, 2, 1)
    ]
    assert runs[0] != runs[1]
    assert runs[0] == runs[2]


# --- exact distribution --------------------------------------------------------------------


def chi2_quantile(q: float, df: int) -> float:
    """x with P(chi2_df <= x) = q, by bisection on the regularised upper incomplete gamma."""
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        upper_tail = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(mid / 2, dtype=torch.float64))
        lo, hi = (mid, hi) if upper_tail > 1 - q else (lo, mid)
    return hi


def test_chi2_quantile_matches_tables():
    for df, table in [(1, 10.828), (4, 18.467), (7, 24.322)]:
        assert chi2_quantile(0.999, df) == pytest.approx(table, abs=1e-3)


def chi2_statistic(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    expected = expected_probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


LOGITS_8 = torch.tensor([1.0, 2.5, 0.3, -1.0, 2.0, 0.8, -0.4, 1.6])


def _expected(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Independent float64 reference: temperature, top-k, renormalise, top-p, min-p."""
    probs = (LOGITS_8.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[:top_k] if top_k > 0 else order] = True
    probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
    mass = 0.0
    for i in order.tolist():
        if mass >= top_p:
            keep[i] = False
        mass += float(probs[i])
    keep &= probs >= min_p * probs.max()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


DISTRIBUTION_CASES = [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.3),
    dict(temperature=0.5, top_k=6, top_p=0.9),
]


@pytest.mark.parametrize("params", DISTRIBUTION_CASES, ids=str)
def test_unseeded_rows_sample_the_exact_distribution(params):
    rows, calls = 4000, 5
    sampler = Sampler(seed=2024)
    requests = [make_request(request_id=str(i), **params) for i in range(rows)]
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(calls):
        tokens = sampler(LOGITS_8.expand(rows, -1), requests).token_ids
        counts += torch.bincount(tokens, minlength=8)
    stat, df = chi2_statistic(counts, _expected(**params))
    assert stat < chi2_quantile(0.999, df)
    # The test has power: the same draws are far from the untransformed softmax.
    wrong, _ = chi2_statistic(counts, _expected())
    assert wrong > chi2_quantile(0.999, 7)


def test_a_seeded_row_samples_the_exact_distribution():
    params = dict(seed=5, temperature=0.8, top_k=6)
    request = make_request(**params)
    sampler = Sampler()
    draws = [int(sampler(LOGITS_8[None], [request]).token_ids[0]) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=8).double()
    stat, df = chi2_statistic(counts, _expected(**{k: v for k, v in params.items() if k != "seed"}))
    assert stat < chi2_quantile(0.999, df)


def test_categorical_sample_never_draws_masked_tokens():
    logits = torch.tensor([[NEG_INF, 0.0, NEG_INF, 0.0, NEG_INF]]).expand(3, -1)
    top = 1.0 - 2**-53  # torch.rand's largest float64
    uniforms = torch.tensor([[0.0, 0.0], [0.0, 0.5], [top, top]], dtype=torch.float64)
    assert categorical_sample(logits, uniforms).tolist() == [1, 3, 3]


def test_categorical_sample_picks_the_block_then_the_token():
    logits = torch.full((3, 1000), NEG_INF)
    logits[:, [3, 700, 999]] = torch.tensor([0.0, 0.0, math.log(2.0)])  # probs 1/4, 1/4, 1/2
    uniforms = torch.tensor([[0.2, 0.9], [0.3, 0.0], [0.6, 0.1]], dtype=torch.float64)
    assert categorical_sample(logits, uniforms).tolist() == [3, 700, 999]


def test_categorical_sample_is_exact_across_blocks_and_tiny_probabilities():
    support = torch.tensor([0, 255, 256, 511, 700, 999])
    probs = torch.tensor([0.3, 0.05, 0.2, 0.15, 0.2998, 2e-4], dtype=torch.float64)
    logits = torch.full((1000,), NEG_INF)
    logits[support] = probs.log().float()
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(10):
        tokens = categorical_sample(logits.expand(4000, -1), torch.rand(4000, 2, dtype=torch.float64, generator=gen))
        assert torch.isin(tokens, support).all()
        counts += (tokens[:, None] == support).sum(0)
    stat, df = chi2_statistic(counts, probs)
    assert stat < chi2_quantile(0.999, df)


# --- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_at_the_chosen_tokens():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3)) * 3
    before = logits.clone()
    requests = [
        make_request(logprobs=3, temperature=0.7, top_k=10, repetition_penalty=1.5, output=[4, 5]),
        make_request(logprobs=0, temperature=1.0, top_p=0.5),
        make_request(logprobs=None, temperature=1.0, seed=3),
        make_request(logprobs=5, temperature=0.0, presence_penalty=1.0, output=[7]),
        make_request(logprobs=1, temperature=0.0),
    ]
    out = Sampler()(logits, requests)
    assert torch.equal(logits, before)
    raw = before.log_softmax(-1)
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, raw[torch.arange(5), out.token_ids])
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (5, 5)  # k = the largest request in the batch
    assert torch.equal(values, raw.gather(-1, ids))
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert torch.equal(values, raw.topk(5, dim=-1).values)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_without_top_logprobs_request(temperature):
    logits = torch.randn(4, 30)
    requests = [make_request(temperature=temperature, min_tokens=1, eos=0) for _ in range(4)]
    out = Sampler()(logits, requests)
    assert out.top_logprobs is None
    assert torch.allclose(out.logprobs, logits.log_softmax(-1)[torch.arange(4), out.token_ids], atol=1e-6)


def test_mismatched_batch_is_rejected():
    with pytest.raises(ValueError, match="requests"):
        Sampler()(torch.zeros(2, 5), [make_request()])
