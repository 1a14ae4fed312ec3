import math

import numpy as np
import pytest

from sprintllm.sampling_params import SamplingParams

INVALID = [
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)),
    ("temperature", dict(temperature="0.5")),
    ("temperature", dict(use_beam_search=True, best_of=2, temperature=0.7)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=math.nan)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=2.5)),
    ("n", dict(n=0)),
    ("n", dict(n=1.5)),
    ("n", dict(n=True)),
    ("best_of", dict(n=3, best_of=2)),
    ("best_of", dict(best_of=2.0)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.1)),
    ("min_p", dict(min_p=math.nan)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=8.5)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=5, max_tokens=3)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=1.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=math.nan)),
    ("repetition_penalty", dict(repetition_penalty=math.inf)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=math.nan)),
    ("frequency_penalty", dict(frequency_penalty=-3.0)),
    ("seed", dict(seed=2**64)),
    ("seed", dict(seed=-(2**63) - 1)),
    ("seed", dict(seed=1.5)),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=["2"])),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=["ok", 3])),
    ("length_penalty", dict(length_penalty=0.5)),
    ("length_penalty", dict(use_beam_search=True, length_penalty=math.nan)),
]


@pytest.mark.parametrize("name,kwargs", INVALID, ids=[f"{n}-{kw}" for n, kw in INVALID])
def test_invalid_value_raises_naming_the_parameter(name, kwargs):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        SamplingParams(**kwargs)


def test_defaults_and_boundary_values_are_accepted():
    params = SamplingParams()
    assert (params.n, params.best_of, params.stop, params.stop_token_ids) == (1, 1, [], [])
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=1.0, max_tokens=1, min_tokens=1, logprobs=0)
    SamplingParams(top_k=-1, min_p=0.0, presence_penalty=-2.0, frequency_penalty=2.0, seed=2**64 - 1)
    SamplingParams(n=2, best_of=4, max_tokens=None, min_tokens=100, seed=-(2**63))
    SamplingParams(use_beam_search=True, best_of=3, temperature=0.0, length_penalty=0.8)


def test_numpy_scalars_are_accepted():
    params = SamplingParams(n=np.int64(2), top_k=np.int32(5), temperature=np.float32(0.5), top_p=np.float64(0.9))
    assert params.best_of == 2


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


@pytest.mark.parametrize("kwargs,greedy", [
    (dict(temperature=0.0), True),
    (dict(top_k=1), True),
    (dict(temperature=0.5, top_k=2), False),
])
def test_greedy_property(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy
