"""Tokenizer loading (transformers' fast tokenizers, local files only): from an HF directory's
tokenizer files, or from a GGUF file's metadata."""
from __future__ import annotations

from pathlib import Path

from sprintllm.models.loader import ModelLoadError, is_gguf_path


def load_tokenizer(path: str):
    path = Path(path)
    if is_gguf_path(path):
        return _load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: no usable tokenizer ({error})") from error


def _load_gguf_tokenizer(path: Path):
    """A GGUF file carries its tokenizer as metadata (vocabulary, merges, special token ids,
    `tokenizer.chat_template`); transformers rebuilds a fast tokenizer, chat template
    included, from those keys."""
    from transformers import AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        # KeyError/IndexError: the file lacks tokenizer keys, or its special token ids are out of range.
        raise ModelLoadError(
            f"{path}: no usable tokenizer in the GGUF metadata ({type(error).__name__}: {error})") from error
