import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A default tiny Llama checkpoint with its tokenizer, built once per session. Read-only:
    tests that damage a checkpoint build their own with build_tiny_model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
