"""Tiny random HF models with a real tokenizer, built locally for tests (no hub access).

    path = build_tiny_model(tmp_path / "m", family="qwen2", num_shards=2, tie_word_embeddings=True)

gives an HF directory (config.json, safetensors, tokenizer files with a ChatML chat template)
that both transformers and sprintllm load. The same arguments always build the same weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    # Wider than the usual 0.02 so logits have clear gaps: greedy tokens then do not hinge on
    # float rounding differences between implementations.
    initializer_range=0.1,
)

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
    "step. In the beginning the universe was created; this has made a lot of people very angry and been "
    "widely regarded as a bad move. It was the best of times, it was the worst of times, it was the age "
    "of wisdom, it was the age of foolishness. Call me Ishmael. Some years ago, never mind how long "
    "precisely, having little or no money in my purse, and nothing particular to interest me on shore, "
    "I thought I would sail about a little and see the watery part of the world. The sky above the port "
    "was the color of television, tuned to a dead channel. All happy families are alike; each unhappy "
    "family is unhappy in its own way. Hello, world! How are you today? I am fine, thank you. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024."
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TEXT: every string encodes, special tokens are ids 0, 1, 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir, family: str = "llama", num_shards: int = 1, seed: int = 0,
                     **config_overrides) -> Path:
    out_dir = Path(out_dir)
    config_cls, model_cls = FAMILIES[family]
    settings = {**DEFAULTS, **config_overrides}
    # 256 byte symbols + specials + a few merges must fit in the model's vocabulary.
    if settings["vocab_size"] < 300:
        raise ValueError("tiny models need vocab_size >= 300 for the byte-level tokenizer")
    tokenizer = build_tokenizer(min(settings["vocab_size"], 400))
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = config_cls(**settings, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)

    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        # transformers initialises biases to 0 and norms to 1; random values make a loader that
        # drops or swaps them fail the comparison.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(1.0, 0.1)

    out_dir.mkdir(parents=True, exist_ok=True)
    max_shard_size = None
    if num_shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard_size = total // num_shards + 1
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out_dir)
    if num_shards > 1 and not (out_dir / "model.safetensors.index.json").exists():
        raise RuntimeError(f"expected a sharded checkpoint in {out_dir}")
    return out_dir

