"""Tokenizer loading (transformers' fast tokenizers, local files only)."""
from __future__ import annotations

from pathlib import Path

from sprintllm.models.loader import ModelLoadError


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(path)), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: no usable tokenizer ({error})") from error
