"""Read a llama.cpp GGUF file: an HF config from its metadata, and its tensors as raw rows
under HF names, in HF's row order.

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.config                          # a transformers LlamaConfig / Qwen2Config
    model.tensors["blk.0.attn_q.weight"]  # GGUFTensor: hf_name, ggml_type, shape, raw uint8 rows
    for hf_name, weight in iter_weights(model, torch.float32): ...  # matrices stay GGUFTensors

Every quantized GGML type packs each row (the last, contiguous dimension) into whole blocks,
so a row is a fixed number of bytes and a tensor is a [rows, bytes_per_row] byte matrix. The
one layout change llama.cpp's converter makes -- it reorders the rows of the q and k
projections -- moves whole rows, so we undo it on those bytes without dequantizing; a
quantized-in-memory loader can take `GGUFTensor.data` as it is.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from sprintllm.models.loader import ModelLoadError
from sprintllm.quant.gguf import SUPPORTED_TYPES, row_bytes
from sprintllm.quant.gguf import dequantize as gguf_dequantize


# general.architecture -> (config class, HF architecture name, does the converter reorder q/k rows?)
# llama.cpp writes Mistral and SmolLM checkpoints as "llama". It reorders q/k rows only for
# models whose rope it runs in the interleaved ("normal") layout; Qwen2 runs in HF's own
# rotate-half ("neox") layout, so its rows are stored untouched.
_ARCHITECTURES = {
    "llama": (LlamaConfig, "LlamaForCausalLM", True),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM", False),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Arrays longer than this (the vocabulary, merges, token types) stay out of `metadata`.
_MAX_METADATA_ARRAY = 1024


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # as stored in the file, e.g. "blk.0.attn_q.weight"
    hf_name: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in torch order: (out_features, in_features) for a weight
    # uint8 [rows, bytes_per_row], rows = prod(shape[:-1]); a view of the file's memory map
    # except for q/k tensors, whose rows were reordered into a copy.
    data: torch.Tensor


@dataclass
class GGUFModel:
    path: Path
    config: PretrainedConfig
    metadata: dict[str, Any]  # every key except long arrays (the tokenizer vocabulary)
    tensors: dict[str, GGUFTensor]  # by GGUF name, in file order


def read_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF file (memory-mapped; nothing is dequantized). Every problem with the file
    raises ModelLoadError naming the file."""
    path = Path(path)
    reader = _open(path)
    try:
        metadata = _metadata(reader)
    except ValueError as e:  # e.g. a string that is not UTF-8
        raise ModelLoadError(f"{path}: corrupt GGUF metadata ({e})") from e
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    raw_tensors = {t.name: t for t in reader.tensors}
    config = _build_config(path, metadata, len(tokens.data) if tokens else None, raw_tensors)
    _, _, reorders_qk = _ARCHITECTURES[metadata["general.architecture"]]
    tensors = {}
    for name, tensor in raw_tensors.items():
        record = _tensor_record(path, tensor)
        projection = record.hf_name.split(".")[-2]
        if reorders_qk and projection in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if projection == "q_proj" else config.num_key_value_heads
            record = _undo_qk_reorder(path, record, heads)
        tensors[name] = record
    return GGUFModel(path, config, metadata, tensors)


def read_gguf_config(path: str | Path) -> PretrainedConfig:
    return read_gguf(path).config


def iter_weights(model: GGUFModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
    """(HF name, tensor) for loading a model that keeps GGUF blocks (quant.gguf.method):
    matrices as GGUFTensors, vectors (norm weights, biases) as float tensors in `dtype`."""
    for tensor in model.tensors.values():
        yield tensor.hf_name, tensor if len(tensor.shape) == 2 else dequantize(tensor).to(dtype)


def iter_dequantized_weights(model: GGUFModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float tensor) for every tensor, one at a time so that peak memory is the
    model plus one tensor."""
    for tensor in model.tensors.values():
        yield tensor.hf_name, dequantize(tensor).to(dtype)


def dequantize(tensor: GGUFTensor) -> torch.Tensor:
    """float32 values of one tensor."""
    return gguf_dequantize(tensor.data, tensor.ggml_type, tensor.shape)


# ---- the file ------------------------------------------------------------------------------
def _open(path: Path) -> GGUFReader:
    if not path.exists():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"GGUF path {path} is not a file")
    _check_header(path)
    try:
        # Copy-on-write mapping: the arrays are writable, so torch can wrap them without a
        # copy, while the file on disk is never changed.
        return GGUFReader(path, "c")
    except ValueError as e:
        unknown_type = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))  # e.g. "np.uint32(99)"
        if unknown_type:
            raise ModelLoadError(f"{path}: a tensor has unknown GGML type id {unknown_type[1]}") from e
        raise ModelLoadError(f"{path}: cannot read GGUF file, it is truncated or corrupt ({e})") from e
    except Exception as e:  # noqa: BLE001 - the reader indexes raw bytes; a damaged file fails anywhere in it
        raise ModelLoadError(f"{path}: cannot read GGUF file, it is truncated or corrupt "
                             f"({type(e).__name__}: {e})") from e


def _check_header(path: Path) -> None:
    """Magic and version, checked here for messages that say what is wrong."""
    with open(path, "rb") as f:
        header = f.read(8)
    if len(header) < 8:
        raise ModelLoadError(f"{path}: truncated GGUF file ({len(header)} bytes, shorter than its header)")
    magic, version = struct.unpack("<4sI", header)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (magic number {magic!r}, expected b'GGUF')")
    if version and not version & 0xFFFF:
        # A small version read with the wrong byte order: the file was written big-endian.
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version} (sprintllm reads versions 2 and 3)")


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header (version, counts), which the reader also lists as fields
        if field.types[0] == GGUFValueType.ARRAY and len(field.data) > _MAX_METADATA_ARRAY:
            continue
        metadata[key] = field.contents()
    return metadata


# ---- config ---------------------------------------------------------------------------------
def _build_config(path: Path, metadata: dict[str, Any], num_tokens: int | None,
                  tensors: dict[str, Any]) -> PretrainedConfig:
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} "
                             f"(supported: {', '.join(sorted(_ARCHITECTURES))})")
    config_cls, hf_architecture, _ = _ARCHITECTURES[arch]

    def get(key: str, kind: type, default: Any = ...) -> Any:
        """One `{arch}.` key, checked: ints positive, floats may be stored as ints."""
        value = metadata.get(f"{arch}.{key}", default)
        if value is ...:
            raise ModelLoadError(f"{path}: metadata key {arch}.{key} is missing")
        if value is None:
            return None
        valid = {int: lambda v: type(v) is int and v > 0, float: lambda v: type(v) in (int, float),
                 str: lambda v: type(v) is str}[kind]
        if not valid(value):
            raise ModelLoadError(f"{path}: metadata key {arch}.{key} should be a "
                                 f"{'positive ' if kind is int else ''}{kind.__name__}, got {value!r}")
        return kind(value)

    hidden = get("embedding_length", int)
    heads = get("attention.head_count", int)
    head_dim = get("attention.key_length", int, hidden // heads)
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (rope.dimension_count "
                             f"{metadata[f'{arch}.rope.dimension_count']} < head_dim {head_dim}) are not supported")
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{path}: per-frequency rope factors (tensor rope_freqs.weight, how llama.cpp "
                             "stores Llama 3.1-style rope scaling) are not supported yet")
    vocab_size = get("vocab_size", int, None) or num_tokens
    if vocab_size is None and "token_embd.weight" in tensors:
        vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims run innermost first

    options = dict(
        architectures=[hf_architecture],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length", int),
        num_hidden_layers=get("block_count", int),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", int, heads),
        head_dim=head_dim,
        max_position_embeddings=get("context_length", int),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_parameters=_rope_parameters(path, get),
        # llama.cpp stores no output matrix when the model reuses its embedding.
        tie_word_embeddings="output.weight" not in tensors,
        **_special_token_ids(metadata),
    )
    if arch == "llama":
        options["attention_bias"] = "blk.0.attn_q.bias" in tensors
        options["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    try:
        return config_cls(**options)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: its metadata makes no valid {config_cls.__name__}: {e}") from e


def _rope_parameters(path: Path, get) -> dict[str, Any]:
    """transformers' rope_parameters from llama.cpp's rope keys; our model (or transformers'
    config validation) rejects the scaling types it does not implement."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": get("rope.freq_base", float, 10000.0)}
    scaling, factor = get("rope.scaling.type", str, None), get("rope.scaling.factor", float, None)
    if scaling is None and get("rope.scale_linear", float, None):  # the key older files used
        scaling, factor = "linear", get("rope.scale_linear", float)
    if scaling in (None, "none"):
        return params
    if factor is None:
        raise ModelLoadError(f"{path}: rope scaling type {scaling!r} without a rope.scaling.factor")
    params.update(rope_type=scaling, factor=factor)
    original = get("rope.scaling.original_context_length", int, None)
    if original is not None:
        params["original_max_position_embeddings"] = original
    return params


def _special_token_ids(metadata: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids. Chat models also name an end-of-turn (and end-of-message) token that
    ends generation; those join eos as a list, as HF generation configs list them."""
    bos, pad = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.padding_token_id")
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token = metadata.get(f"tokenizer.ggml.{key}")
        if token is not None and token not in eos:
            eos.append(token)
    return dict(bos_token_id=bos, pad_token_id=pad, eos_token_id=eos[0] if len(eos) == 1 else (eos or None))


# ---- tensors --------------------------------------------------------------------------------
def _hf_name(path: Path, name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    raise ModelLoadError(f"{path}: unexpected tensor {name!r} (not part of a Llama-family model)")


def _tensor_record(path: Path, tensor) -> GGUFTensor:
    ggml_type = tensor.tensor_type
    if ggml_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has type {ggml_type.name}, which sprintllm "
                             f"cannot load yet (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # The reader gives float tensors typed and quantized ones as bytes; both become byte rows.
    rows = np.asarray(tensor.data).view(np.uint8).reshape(-1, row_bytes(ggml_type, shape[-1]))
    return GGUFTensor(tensor.name, _hf_name(path, tensor.name), ggml_type, shape, torch.from_numpy(rows))


def qk_row_order(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row i of the HF q/k projection is row order[i] of the GGUF one.

    HF rotates each head's dimensions in two halves: pair j is (j, j + D/2). llama.cpp's
    converter stores each head's rows as interleaved pairs instead (2j, 2j + 1): new row
    2j + half holds HF row half * D/2 + j. The k projection is reordered per KV head.
    """
    head_dim = num_rows // num_heads
    return torch.arange(num_rows).view(num_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _undo_qk_reorder(path: Path, tensor: GGUFTensor, num_heads: int) -> GGUFTensor:
    num_rows = tensor.shape[0]
    if num_rows % num_heads or (num_rows // num_heads) % 2:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has {num_rows} rows, which do not split into "
                             f"{num_heads} heads of even size")
    order = qk_row_order(num_rows, num_heads)
    if len(tensor.shape) == 2:
        data = tensor.data[order]
    else:  # a bias: one row of elements, reordered element by element
        block_size, element_bytes = GGML_QUANT_SIZES[tensor.ggml_type]
        if block_size != 1:
            raise ModelLoadError(f"{path}: bias {tensor.name!r} is block-quantized ({tensor.ggml_type.name})")
        data = tensor.data.view(num_rows, element_bytes)[order].reshape(1, -1)
    return GGUFTensor(tensor.name, tensor.hf_name, tensor.ggml_type, tensor.shape, data)
