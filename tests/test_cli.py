"""The `sprintllm` command line: generate prints text and a stats table; chat keeps a conversation."""
from __future__ import annotations

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
