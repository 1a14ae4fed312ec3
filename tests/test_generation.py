"""Generation features end to end: n>1 on shared blocks, beam search, stops, logprobs, streaming, bad input."""
from __future__ import annotations

import pytest
import torch

from sprintllm import LLM, SamplingParams
from sprintllm.models.loader import ModelLoadError
from tests.test_engine import _hf_model, hf_greedy, prompts_of
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gen"), family="llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), num_kv_blocks=96, block_size=8)


def assert_no_leaks(llm):
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_n4_samples_share_prompt_blocks(llm):
    engine = llm.engine
    prompt = prompts_of([29], seed=5)[0]  # 3 full blocks of 8 plus a partial one
    engine.add_request({"prompt_token_ids": prompt}, SamplingParams(n=4, max_tokens=6, seed=1), request_id="n4")
    engine.step()  # prefill, first token of every sample, forks
    seqs = engine.groups["n4"].live
    assert len(seqs) == 4
    tables = [s.block_table for s in seqs]
    full_prompt_blocks = tables[0][:3]
    assert all(t[:3] == full_prompt_blocks for t in tables)
    assert all(engine.block_manager.ref_count(b) == 4 for b in full_prompt_blocks)
    in_use = engine.num_blocks - engine.block_manager.num_free_blocks
    assert in_use == 4  # the prompt's 4 blocks, held once for all four samples
    engine.step()  # each sample writes its own next token: the shared partial block is copied
    tables = [s.block_table for s in engine.groups["n4"].live]
    assert len({t[3] for t in tables}) == 4
    assert all(engine.block_manager.ref_count(b) == 4 for b in full_prompt_blocks)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert len(final.outputs) == 4 and all(len(c.token_ids) == 6 for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    assert_no_leaks(llm)


def test_seeded_sampling_reproducible_regardless_of_batch(llm):
    prompt = {"prompt_token_ids": prompts_of([12], seed=6)[0]}
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=1234)
    alone = llm.generate([prompt], params)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in prompts_of([9, 20], seed=7)]
    crowded = llm.generate([others[0], prompt, others[1]],
                           [SamplingParams(temperature=1.0, max_tokens=20), params, SamplingParams(max_tokens=5)])
    assert crowded[1].outputs[0].token_ids == alone
    different = llm.generate([prompt], SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=99))
    assert different[0].outputs[0].token_ids != alone


def _hf_beam(model_dir, prompt, width, n, new_tokens):
    model = _hf_model(model_dir)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
                         num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=0, length_penalty=1.0, early_stopping=False)
    return [row[len(prompt):].tolist() for row in out]


def test_beam_search_matches_transformers_and_shares_blocks(llm, model_dir):
    prompt = prompts_of([13], seed=8)[0]
    params = SamplingParams(use_beam_search=True, best_of=4, n=2, temperature=0, max_tokens=10, ignore_eos=True)
    peak_shared = 0
    engine = llm.engine
    engine.add_request({"prompt_token_ids": prompt}, params, request_id="beam")
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        group = engine.groups.get("beam")
        if group and len(group.live) > 1:
            first_block = group.live[0].block_table[0]
            peak_shared = max(peak_shared, engine.block_manager.ref_count(first_block))
    assert peak_shared == 4  # all four beams read the prompt's first block from one copy
    ours = [c.token_ids for c in final.outputs]
    assert ours == _hf_beam(model_dir, prompt, width=4, n=2, new_tokens=10)
    assert_no_leaks(llm)


def test_stop_strings_and_stop_tokens(llm):
    prompt = {"prompt_token_ids": prompts_of([10], seed=9)[0]}
    free_run = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    token = free_run.token_ids[5]
    by_token = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   stop_token_ids=[token]))[0].outputs[0]
    assert by_token.token_ids == free_run.token_ids[:free_run.token_ids.index(token) + 1]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == token
    text = free_run.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        by_text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
        assert by_text[0].outputs[0].text == text[:text.index(stop)]
        assert by_text[0].outputs[0].finish_reason == "stop"
    assert free_run.finish_reason == "length"
    assert_no_leaks(llm)


def test_logprobs_topk(llm, model_dir):
    prompt = prompts_of([8], seed=10)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3, logprobs=3))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 3
    ref = torch.log_softmax(_hf_model(model_dir)(torch.tensor([prompt])).logits[0, -1], -1)
    first = completion.logprobs[0]
    top3 = torch.topk(ref, 3)
    assert set(first) == set(top3.indices.tolist())
    assert first[completion.token_ids[0]] == pytest.approx(top3.values[0].item(), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)), abs=1e-4)


def test_streaming_yields_growing_text_and_abort_frees(llm, model_dir):
    prompt = prompts_of([10], seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    seen = [out.outputs[0].token_ids for out in llm.stream({"prompt_token_ids": prompt}, params)]
    assert [len(s) for s in seen] == list(range(1, 17))
    assert seen[-1] == hf_greedy(model_dir, prompt, 16)
    stream = llm.stream({"prompt_token_ids": prompt}, params)
    next(stream), next(stream)
    stream.close()  # the caller walked away: its request must be aborted
    assert_no_leaks(llm)


def test_chat_template(llm):
    outs = llm.chat([{"role": "user", "content": "hello there"}], SamplingParams(temperature=0, max_tokens=4))
    ids = outs[0].prompt_token_ids
    tok = llm.get_tokenizer()
    assert "<|im_start|>" in tok.decode(ids) and "hello there" in tok.decode(ids)


def test_prompt_too_long_names_both_lengths(llm):
    too_long = [3 + i % 400 for i in range(llm.engine.max_model_len + 5)]
    with pytest.raises(ValueError, match=rf"{len(too_long)}.*{llm.engine.max_model_len}"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": too_long}])
    assert_no_leaks(llm)
    assert not llm.engine.groups


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(n=0),
                                 dict(top_k=-5), dict(min_p=2), dict(max_tokens=0)])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path / "empty"))


def test_unknown_engine_option_is_rejected(model_dir):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(str(model_dir), max_num_seq=4)
