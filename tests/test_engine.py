"""End-to-end engine tests: sprintllm's greedy tokens against transformers on the same weights."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sprintllm import LLM, SamplingParams
from sprintllm.engine.engine import Engine
from sprintllm.config import EngineConfig
from tests.tiny_models import build_tiny_model

NEW_TOKENS = 32
FAMILIES = {
    "llama-gqa-tied": dict(family="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mqa-untied-hd80": dict(family="llama", hidden_size=160, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=80, tie_word_embeddings=False),
    "mistral-sliding": dict(family="mistral", sliding_window=24),
    "qwen2-bias": dict(family="qwen2"),
}


def prompts_of(lengths: list[int], vocab: int = 500, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """The reference: transformers' own greedy decoding, EOS ignored so every run has full length."""
    model = _hf_model(model_dir)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


_HF_CACHE: dict = {}


def _hf_model(model_dir):
    key = str(model_dir)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF_CACHE[key]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    spec = dict(FAMILIES[request.param])
    return build_tiny_model(tmp_path_factory.mktemp(request.param), **spec)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), family="llama")


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
PROMPT_LENGTHS = [5, 17, 40, 3, 29]


def assert_matches_reference(model_dir, prompts, outputs):
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt)


def test_greedy_matches_transformers(family_model):
    prompts = prompts_of(PROMPT_LENGTHS)
    llm = LLM(family_model, num_kv_blocks=64, block_size=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert_matches_reference(family_model, prompts, outs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_prefill_logits_match_transformers(family_model):
    prompts = prompts_of([7, 33])
    llm = LLM(family_model, num_kv_blocks=16, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    model = _hf_model(family_model)
    for prompt, out in zip(prompts, outs):
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        ours = out.outputs[0].logprobs[0]
        for token, value in ours.items():
            assert value == pytest.approx(ref[token].item(), abs=1e-4)
        assert set(ours) >= set(torch.topk(ref, 5).indices.tolist())


def _run_with_arrivals(engine: Engine, prompts, arrive_at: list[int], params=GREEDY) -> dict[str, list[int]]:
    """Add each prompt at its own step; collect final tokens by request id."""
    done: dict[str, list[int]] = {}
    step = 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrive_at):
            if at == step:
                engine.add_request({"prompt_token_ids": prompts[i]}, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return done


def test_continuous_batching_with_staggered_arrivals(llama_dir):
    prompts = prompts_of(PROMPT_LENGTHS, seed=1)
    engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=64, block_size=8))
    done = _run_with_arrivals(engine, prompts, arrive_at=[0, 3, 3, 10, 25])
    for i, prompt in enumerate(prompts):
        assert done[str(i)] == hf_greedy(llama_dir, prompt)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_chunked_prefill_matches(llama_dir):
    prompts = prompts_of([60, 45, 9], seed=2)
    engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=16))
    chunks = []
    original = engine.scheduler.schedule

    def spy():
        plan = original()
        chunks.append([n for _, n in plan.scheduled])
        return plan

    engine.scheduler.schedule = spy
    done = _run_with_arrivals(engine, prompts, arrive_at=[0, 1, 2])
    for i, prompt in enumerate(prompts):
        assert done[str(i)] == hf_greedy(llama_dir, prompt)
    assert max(sum(step) for step in chunks) <= 16
    assert any(len(step) > 1 and max(step) > 1 and min(step) == 1 for step in chunks), "prefill chunks never shared a step with decodes"


def test_tiny_cache_forces_preemption_without_losing_requests(llama_dir):
    prompts = prompts_of([20, 18, 22, 19], seed=3)
    engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=14, block_size=8))
    done = _run_with_arrivals(engine, prompts, arrive_at=[0, 0, 0, 0])
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert done[str(i)] == hf_greedy(llama_dir, prompt)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_prefix_caching_reuses_blocks_and_matches(llama_dir):
    shared = prompts_of([32], seed=4)[0]
    prompts = [shared + [7, 8, 9], shared + [11, 12]]
    engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=64, block_size=8))
    first = _run_with_arrivals(engine, prompts[:1], arrive_at=[0])
    engine.add_request({"prompt_token_ids": prompts[1]}, GREEDY, request_id="second")
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    assert outs[0].metrics.num_cached_tokens == 32
    assert first["0"] == hf_greedy(llama_dir, prompts[0])
    assert outs[0].outputs[0].token_ids == hf_greedy(llama_dir, prompts[1])


def test_prefix_caching_off_computes_everything(llama_dir):
    shared = prompts_of([32], seed=4)[0]
    engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=64, block_size=8, enable_prefix_caching=False))
    _run_with_arrivals(engine, [shared + [5]], arrive_at=[0])
    engine.add_request({"prompt_token_ids": shared + [6]}, GREEDY, request_id="again")
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    assert outs[0].metrics.num_cached_tokens == 0


def test_prefill_interval_holds_back_new_prompts_while_decoding(llama_dir):
    prompts = prompts_of([10, 12, 14], seed=12)
    admitted_at: dict[str, int] = {}
    for interval in (1, 4):
        engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=64, block_size=8, prefill_interval=interval))
        engine.add_request({"prompt_token_ids": prompts[0]}, GREEDY, request_id="a")
        engine.step()  # a is now decoding
        engine.add_request({"prompt_token_ids": prompts[1]}, GREEDY, request_id="b")
        steps = 0
        while not any(r.request_id == "b" for r in engine.scheduler.running):
            engine.step()
            steps += 1
        admitted_at[interval] = steps
        while engine.has_unfinished_requests():
            engine.step()
    assert admitted_at[1] == 1
    assert admitted_at[4] == 4


def test_abort_mid_generation_frees_blocks(llama_dir):
    engine = Engine(EngineConfig(model=str(llama_dir), num_kv_blocks=64, block_size=8))
    for i, prompt in enumerate(prompts_of([30, 20], seed=13)):
        engine.add_request({"prompt_token_ids": prompt}, GREEDY, request_id=str(i))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_blocks
    engine.abort("0")
    engine.abort("1")
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert not engine.has_unfinished_requests() and not engine.scheduler.running
