"""Our Llama-family model against transformers on the same tiny random checkpoints."""
import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM

from sprintllm.attention import AttentionMetadata
from sprintllm.models.loader import ModelLoadError, kv_cache_spec, load_model, model_max_len

CONFIGS = {
    "llama-gqa-tied": dict(family="llama", tie_word_embeddings=True),
    # MQA, head_dim 80, untied, and every optional Llama bias.
    "llama-mqa-hd80-bias": dict(family="llama", hidden_size=160, num_attention_heads=2, num_key_value_heads=1,
                                attention_bias=True, mlp_bias=True),
    # original_max_position_embeddings=64 with head_dim 16 puts frequencies in all three llama3 bands.
    "llama3-rope": dict(family="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "llama-linear-rope": dict(family="llama", rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                   factor=4.0)),
    "mistral-window": dict(family="mistral", sliding_window=7, num_key_value_heads=1),
    "qwen2-bias": dict(family="qwen2", tie_word_embeddings=True),
    # Window only on layers >= max_window_layers (here layer 1), as transformers does.
    "qwen2-window-layers": dict(family="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
}
PROMPT_LENS = [5, 17, 30, 9, 1]
BLOCK_SIZE = 4
NUM_NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    ours, hf_config = load_model(path, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # always generate the full length
    return ours, hf, hf_config


def prompts(vocab_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@dataclass
class Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedRunner:
    """Just enough of an engine to drive the model: a shuffled free list of cache blocks and
    flattened ragged batches built by the scheduler's one rule (compute what is not cached)."""

    def __init__(self, model, hf_config, num_blocks=160, seed=0):
        num_layers, num_kv_heads, head_dim = kv_cache_spec(hf_config)
        shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.model = model

    def step(self, seqs: list[Seq], num_tokens: list[int]) -> torch.Tensor:
        """Compute the next num_tokens[i] tokens of seqs[i]; returns hidden states [T, hidden]."""
        input_ids, positions, slots = [], [], []
        for seq, n in zip(seqs, num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            while len(seq.blocks) * BLOCK_SIZE < end:
                seq.blocks.append(self.free.pop())
            for pos in range(start, end):
                input_ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(seq.blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            seq.num_computed = end
        seq_lens = [s.num_computed for s in seqs]
        block_tables = torch.zeros(len(seqs), max(len(s.blocks) for s in seqs) + 1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            block_tables[i, :len(s.blocks)] = torch.tensor(s.blocks)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor([0] + num_tokens).cumsum(0).to(torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            query_lens_list=list(num_tokens),
            seq_lens_list=seq_lens,
            block_size=BLOCK_SIZE,
        )
        with torch.inference_mode():
            return self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, meta)


def test_prefill_logits_match_transformers(models):
    ours, hf, hf_config = models
    batch = prompts(hf_config.vocab_size)
    runner = PagedRunner(ours, hf_config)
    hidden = runner.step([Seq(p) for p in batch], [len(p) for p in batch])  # one ragged batch
    logits = ours.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (sum(PROMPT_LENS), hf_config.vocab_size)
    with torch.inference_mode():
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_chunked_greedy_decode_matches_generate(models):
    """Prompts arrive at different steps and are prefilled in chunks of 8 next to other
    sequences' decode tokens; 32 greedy tokens each must equal transformers' generate()."""
    ours, hf, hf_config = models
    batch = prompts(hf_config.vocab_size, seed=1)
    arrival = [0, 0, 1, 3, 4]
    seqs = [Seq(list(p)) for p in batch]
    runner = PagedRunner(ours, hf_config)
    for step in range(200):
        active = [i for i, s in enumerate(seqs)
                  if arrival[i] <= step and len(s.tokens) - len(batch[i]) < NUM_NEW_TOKENS]
        if not active:
            break
        chunks = [min(8, len(seqs[i].tokens) - seqs[i].num_computed) for i in active]
        hidden = runner.step([seqs[i] for i in active], chunks)
        last = torch.tensor(chunks).cumsum(0) - 1
        next_tokens = ours.compute_logits(hidden[last]).argmax(-1).tolist()
        for i, token in zip(active, next_tokens):
            if seqs[i].num_computed == len(seqs[i].tokens):  # its whole sequence is in the cache
                seqs[i].tokens.append(token)

    with torch.inference_mode():
        for prompt, seq in zip(batch, seqs):
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False)
            expected = expected[0, len(prompt):].tolist()
            assert len(expected) == NUM_NEW_TOKENS
            assert seq.tokens[len(prompt):] == expected


def test_attention_backends_agree_through_the_model(models):
    ours, _, hf_config = models
    reference = type(ours)(hf_config, attention_backend="reference")
    reference.load_state_dict(ours.state_dict())
    batch = prompts(hf_config.vocab_size, seed=2)
    # Two steps: whole prompts, then one decode token each on top of the cached context.
    outs = []
    for model in (ours, reference):
        runner = PagedRunner(model, hf_config)
        seqs = [Seq(p + [7]) for p in batch]
        runner.step(seqs, [len(p) for p in batch])
        outs.append(runner.step(seqs, [1] * len(seqs)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_the_weight(tmp_path):
    tied, _ = load_model(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True), torch.float32)
    untied, _ = load_model(build_tiny_model(tmp_path / "untied", tie_word_embeddings=False), torch.float32)
    assert tied.lm_head.tied is tied.model.embed_tokens and not hasattr(tied.lm_head, "weight")
    assert untied.lm_head.tied is None
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_sharded_checkpoint_loads(tmp_path):
    path = build_tiny_model(tmp_path / "sharded", family="qwen2", num_shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours, hf_config = load_model(path, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = prompts(hf_config.vocab_size)[2]
    logits = ours.compute_logits(PagedRunner(ours, hf_config).step([Seq(prompt)], [len(prompt)]))
    with torch.inference_mode():
        torch.testing.assert_close(logits, hf(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)


def test_bfloat16_load(tiny_llama_dir):
    ours, hf_config = load_model(tiny_llama_dir, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    prompt = prompts(hf_config.vocab_size)[1]
    runner = PagedRunner(ours, hf_config)
    runner.kv_caches = [(k.bfloat16(), v.bfloat16()) for k, v in runner.kv_caches]
    logits = ours.compute_logits(runner.step([Seq(prompt)], [len(prompt)]))
    ref, _ = load_model(tiny_llama_dir, torch.float32)
    expected = ref.compute_logits(PagedRunner(ref, hf_config).step([Seq(prompt)], [len(prompt)]))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)


def test_cache_spec_helpers(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=160, num_attention_heads=2, num_key_value_heads=1,
                            num_hidden_layers=3, max_position_embeddings=300)
    _, hf_config = load_model(path, torch.float32)
    assert kv_cache_spec(hf_config) == (3, 1, 80)
    assert model_max_len(hf_config) == 300


@pytest.fixture
def good_model(tmp_path):
    return build_tiny_model(tmp_path / "good")


def test_loader_errors(tmp_path, good_model):
    def fails(path, match):
        with pytest.raises(ModelLoadError, match=match) as info:
            load_model(path, torch.float32)
        assert str(path) in str(info.value)

    fails(tmp_path / "nope", "does not exist")
    (tmp_path / "file.bin").write_bytes(b"x")
    fails(tmp_path / "file.bin", "not a directory")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no config.json")

    bad = tmp_path / "bad_json"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    fails(bad, "malformed")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good_model / "config.json").read_text())
    fails(no_weights, r"no \*\.safetensors")

    other = tmp_path / "other_arch"
    other.mkdir()
    config = json.loads((good_model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    fails(other, "unsupported architecture 'LlamaForSequenceClassification'.*LlamaForCausalLM.*Qwen2ForCausalLM")

    yarn = tmp_path / "yarn"
    yarn.mkdir()
    (yarn / "model.safetensors").write_bytes((good_model / "model.safetensors").read_bytes())
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 256}
    (yarn / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    fails(yarn, "rope scaling type 'yarn' is not supported")


def test_unexpected_and_missing_weights(good_model):
    weights_file = good_model / "model.safetensors"
    weights = load_file(weights_file)

    save_file({**weights, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, weights_file)
    with pytest.raises(ModelLoadError, match="unexpected weight 'model.layers.0.self_attn.q_norm.weight'"):
        load_model(good_model, torch.float32)

    save_file({k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}, weights_file)
    with pytest.raises(ModelLoadError, match=r"missing.*model.layers.1.self_attn.qkv_proj.weight\[k\]"):
        load_model(good_model, torch.float32)

    save_file({**weights, "model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}, weights_file)
    with pytest.raises(ModelLoadError, match="model.layers.0.mlp.up_proj.weight.*shape mismatch"):
        load_model(good_model, torch.float32)


def test_window_rules_follow_transformers():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from sprintllm.models.llama import LlamaForCausalLM

    small = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=64)

    def windows(config):
        return [layer.self_attn.sliding_window for layer in LlamaForCausalLM(config).model.layers]

    assert windows(LlamaConfig(**small, sliding_window=4)) == [None] * 3  # Llama ignores the key
    assert windows(MistralConfig(**small, sliding_window=4)) == [4] * 3
    assert windows(Qwen2Config(**small, sliding_window=4)) == [None] * 3  # use_sliding_window=False
    assert windows(Qwen2Config(**small, sliding_window=4, use_sliding_window=True, max_window_layers=1)) == [None, 4, 4]


def test_tiny_model_tokenizer(tiny_llama_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    text = "Hello, world! Ünïcode and numbers 12345."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < config.vocab_size and len(tokenizer) <= config.vocab_size
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == config.eos_token_id == config.bos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer(chat).input_ids  # special tokens encode as one id
