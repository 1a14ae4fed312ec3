"""The Llama family: Llama 1-3, SmolLM, Mistral, Qwen2.

They share one architecture (pre-norm decoder, RMSNorm, RoPE, GQA, SwiGLU MLP) and differ
only in config facts read here: head_dim, biases, tied embeddings, rope scaling and which
layers use a sliding window.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sprintllm.attention import AttentionMetadata, get_attention_backend, write_kv_cache
from sprintllm.layers.activation import SiluAndMul
from sprintllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sprintllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from sprintllm.layers.norm import RMSNorm
from sprintllm.layers.rotary import RotaryEmbedding, rope_config
from sprintllm.quant.base import QuantConfig

KVCache = tuple[torch.Tensor, torch.Tensor]

# checkpoint projection -> (our fused parameter, its shard id)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_SHARDS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}


def _attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias). Qwen2 always has q/k/v biases and never an o_proj bias;
    Llama configs say so with `attention_bias`; Mistral has none."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _sliding_window(config, layer_idx: int) -> int | None:
    """The window of one layer, by transformers' rules: Llama never slides (even if its config
    has a `sliding_window` key); Mistral slides on every layer when `sliding_window` is set;
    Qwen2 slides only when `use_sliding_window`, on the layers `layer_types` marks (by default
    those at index >= max_window_layers)."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window
    if config.model_type != "qwen2" or window is None or not getattr(config, "use_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window if layer_idx >= config.max_window_layers else None


def _method(quant_config: QuantConfig | None, layer_kind: str):
    return quant_config.method(layer_kind) if quant_config is not None else None


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, backend, quant_config=None):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        qkv_bias, o_bias = _attention_biases(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads, num_kv_heads,
                                          bias=qkv_bias, quant_method=_method(quant_config, "linear"))
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias,
                                        quant_method=_method(quant_config, "linear"))
        # Per-rank sizes: what this rank's slice of qkv_proj produces.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = _sliding_window(config, layer_idx)
        self.rotary_emb = rotary_emb
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.backend.forward(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.view(num_tokens, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config, quant_config=None):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}: Llama-family MLPs use silu")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias,
                                                       quant_method=_method(quant_config, "linear"))
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias,
                                           quant_method=_method(quant_config, "linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, backend, quant_config=None):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, backend, quant_config)
        self.mlp = LlamaMLP(config, quant_config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        # `residual` carries the stream; `hidden` is the previous sublayer's output not yet added.
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, backend, quant_config=None):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta, scaling = rope_config(config)
        # One table for all layers: it depends only on head_dim and the rope settings.
        rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, theta, scaling)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_method=_method(quant_config, "embedding"))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, backend, quant_config) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, attention_backend: str = "paged", quant_config: QuantConfig | None = None):
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = LlamaModel(config, get_attention_backend(attention_backend), quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_method=_method(quant_config, "lm_head"))
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] for the flattened ragged batch -> hidden states [T, hidden]."""
        native = self.native_decoder
        if native is not None and attn_metadata.is_pure_decode and kv_caches is self._native_caches:
            hidden = self.model.embed_tokens(input_ids)
            out = native.forward(hidden.float(), positions, attn_metadata.slot_mapping, attn_metadata.block_tables,
                                 attn_metadata.seq_lens)
            return out.to(hidden.dtype)
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    native_decoder = None  # set by bind_native_decoder
    _native_caches = None

    def bind_native_decoder(self, kv_caches: list[KVCache], block_size: int) -> str | None:
        """Run pure decode steps over these caches as one C call (sprintllm.kernels.decode)
        instead of ~40 torch ops per layer. Possible when every matrix is a GGUF weight the C
        kernels take, on one CPU rank; returns why not otherwise (prefill and mixed steps
        always take the torch path)."""
        from sprintllm.kernels.decode import DecoderLayerWeights, NativeDecoder

        if not NativeDecoder.available():
            return "the C kernels are unavailable"
        if self.quant_config is None or self.quant_config.name != "gguf":
            return "the weights are not GGUF blocks"
        attn0 = self.model.layers[0].self_attn
        if attn0.qkv_proj.tp_size > 1:
            return "tensor parallelism"
        layers = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.o_proj.bias is not None or mlp.gate_up_proj.bias is not None:
                return "o_proj or MLP biases"
            layers.append(DecoderLayerWeights(
                input_norm=layer.input_layernorm.weight, qkv=attn.qkv_proj.gguf_segments,
                qkv_bias=attn.qkv_proj.bias, o=attn.o_proj.gguf_segments,
                post_norm=layer.post_attention_layernorm.weight, gate_up=mlp.gate_up_proj.gguf_segments,
                down=mlp.down_proj.gguf_segments, sliding_window=attn.sliding_window))
        rope = attn0.rotary_emb
        try:
            self.native_decoder = NativeDecoder(
                layers, self.model.norm.weight, num_heads=attn0.num_heads, num_kv_heads=attn0.num_kv_heads,
                head_dim=attn0.head_dim, rms_eps=self.model.norm.eps, scale=attn0.scale, cos=rope.cos, sin=rope.sin,
                kv_caches=kv_caches, block_size=block_size)
        except ValueError as e:  # e.g. a weight type without a C kernel
            return str(e)
        self._native_caches = kv_caches
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; raises ValueError naming any unexpected or missing weight."""
        params = dict(self.named_parameters())  # a tied lm_head appears once, as the embedding
        loaded = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; we compute our own
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # some tied checkpoints also store the (identical) head
            param_name, shard_id = name, None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in _STACKED:
                fused, shard_id = _STACKED[parts[-2]]
                param_name = ".".join(parts[:-2] + [fused, parts[-1]])
            param = params.get(param_name)
            if param is None:
                raise ValueError(f"unexpected weight {name!r} in checkpoint for {type(self).__name__}")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"weight {name!r}: {e}") from e
            loaded.add((param_name, shard_id))

        expected = {(n, s) for n in params for s in _SHARDS.get(n.split(".")[-2], (None,))}
        missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"weights missing from checkpoint: {', '.join(missing[:10])}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        for module in self.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
