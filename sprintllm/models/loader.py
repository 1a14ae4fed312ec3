"""Load an HF model directory (config.json + *.safetensors) or a GGUF file into our model classes."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from sprintllm.models.registry import get_model_class

_INDEX = "model.safetensors.index.json"


class ModelLoadError(ValueError):
    """The model path cannot be loaded; the message names the path and what is wrong."""


def is_gguf_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_hf_config(path: str | os.PathLike) -> PretrainedConfig:
    path = Path(path)
    if is_gguf_path(path):
        from sprintllm.models.gguf_loader import read_gguf_config  # lazy: it imports this module

        return read_gguf_config(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory (expected an HF model directory or a .gguf file)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in model directory {path}")
    try:
        json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"malformed {config_file}: {e}") from e
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError... for a bad config
        raise ModelLoadError(f"cannot read model config {config_file}: {e}") from e


def kv_cache_spec(hf_config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): the shape of the paged cache one model needs."""
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return hf_config.num_hidden_layers, num_kv_heads, head_dim


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters and buffers, plus the quantized
    matrices a QuantMethod keeps outside of parameters (GGUF segments), each counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += [getattr(segment, "data", getattr(segment, "weight", None))
                    for segment, _ in getattr(module, "gguf_segments", ())]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if t is not None}
    return sum(unique.values())


def model_max_len(hf_config: PretrainedConfig) -> int:
    """The longest sequence the model supports: its rotary table is this long."""
    return int(hf_config.max_position_embeddings)


def load_model(
    model_path: str | os.PathLike,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    attention_backend: str = "paged",
) -> tuple[nn.Module, PretrainedConfig]:
    """Build the model for an HF directory's config and stream its safetensors weights into it,
    or build it from a GGUF file's metadata with its matrices kept in their GGUF block
    formats (norms in `dtype`).
    Every problem with the directory or file raises ModelLoadError naming the path."""
    path = Path(model_path)
    weights = None  # a lazy stream of (HF name, tensor)
    quant_config = None
    if is_gguf_path(path):
        from sprintllm.models.gguf_loader import iter_weights, read_gguf  # lazy: imports this module
        from sprintllm.quant.gguf.method import GGUFConfig

        gguf_model = read_gguf(path)
        hf_config, weights, quant_config = gguf_model.config, iter_weights(gguf_model, dtype), GGUFConfig()
    else:
        hf_config = load_hf_config(path)
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError(f"{path / 'config.json'} names no architecture ('architectures' is empty)")
    try:
        model_cls = get_model_class(architectures[0])
    except ValueError as e:
        raise ModelLoadError(f"cannot load {path}: {e}") from e
    if weights is None:
        weights = _iter_weights(_safetensors_files(path), dtype, device)

    try:
        with _default_dtype(dtype), torch.device(device):
            model = model_cls(hf_config, attention_backend=attention_backend, quant_config=quant_config)
    except (ValueError, NotImplementedError) as e:  # a config feature we do not support
        raise ModelLoadError(f"cannot build {architectures[0]} for {path}: {e}") from e
    try:
        model.load_weights(weights)
    except ValueError as e:
        raise ModelLoadError(f"cannot load weights from {path}: {e}") from e
    del weights
    _release_freed_memory()
    return model.eval(), hf_config


def _release_freed_memory() -> None:
    """Loading frees a lot in small pieces (the GGUF reader's metadata objects, repacking
    copies); glibc keeps freed heap pages unless asked, which would leave the process ~20%
    larger than its weights. Elsewhere this is a no-op."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _safetensors_files(path: Path) -> list[Path]:
    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"malformed {index}: {e!r}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shard files missing from {path}: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weight files in model directory {path}")
    return files


def _iter_weights(files: list[Path], dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream tensors one at a time so peak memory is the model plus one tensor."""
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created in the target dtype, so loading never holds a float32 copy.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
