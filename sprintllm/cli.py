"""The `sprintllm` command: generate, chat.

Engine options come straight from EngineConfig, so every option has one name:
`LLM(max_num_seqs=8)` is `--max-num-seqs 8`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from sprintllm.config import EngineConfig
from sprintllm.sampling_params import SamplingParams

_SAMPLING_FLAGS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "n", "best_of",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "ignore_eos",
                   "logprobs", "use_beam_search", "length_penalty"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, names: list[str], group_title: str) -> None:
    group = parser.add_argument_group(group_title)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        field = defaults[name]
        default = field.default if field.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=default)
        elif name == "stop":
            group.add_argument(_flag(name), dest=name, action="append", default=None, help="stop string (repeatable)")
        else:
            kind = type(default) if default is not None else (int if name in ("best_of", "logprobs", "num_kv_blocks", "max_model_len") else str)
            group.add_argument(_flag(name), dest=name, type=kind, default=default, help=f"default: {default}")


def engine_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in EngineConfig.field_names() if hasattr(args, name)}


def sampling_options(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{name: getattr(args, name) for name in _SAMPLING_FLAGS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sprintllm", description="LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)
    engine_names = EngineConfig.field_names()

    gen = commands.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="*", default=["Once upon a time"], help="prompt text(s)")
    gen.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat turn")
    _add_dataclass_options(gen, EngineConfig, engine_names, "engine")
    _add_dataclass_options(gen, SamplingParams, _SAMPLING_FLAGS, "sampling")
    gen.set_defaults(func=cmd_generate, max_tokens=64)

    chat = commands.add_parser("chat", help="interactive multi-turn chat (streams tokens)")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_dataclass_options(chat, EngineConfig, engine_names, "engine")
    _add_dataclass_options(chat, SamplingParams, _SAMPLING_FLAGS, "sampling")
    chat.set_defaults(func=cmd_chat, max_tokens=256, temperature=0.7)
    return parser


def _make_llm(args):
    from sprintllm.llm import LLM

    options = engine_options(args)
    start = time.perf_counter()
    llm = LLM(**options)
    print(f"loaded {llm.config.model} in {time.perf_counter() - start:.1f}s "
          f"({llm.engine.num_blocks} KV blocks of {args.block_size} tokens; native decode: "
          f"{llm.engine.runner.native_decode_off_reason or 'on'})", file=sys.stderr)
    return llm


def cmd_generate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    llm = _make_llm(args)
    params = sampling_options(args)
    prompts = [{"prompt_token_ids": llm.encode_chat([{"role": "user", "content": p}]), "prompt": p}
               if args.chat_template else p for p in args.prompts]
    console = Console()
    table = Table(title="generation stats")
    for column in ("prompt", "prompt tokens", "new tokens", "time to first token", "decode tok/s", "finish"):
        table.add_column(column)
    for prompt, text_out in zip(args.prompts, _run_timed(llm, prompts, params)):
        out, ttft, decode_rate = text_out
        console.rule(f"[bold]{prompt[:60]}")
        for completion in out.outputs:
            console.print(prompt, style="dim", end="")
            console.print(completion.text, highlight=False, markup=False)
            table.add_row(prompt[:30], str(len(out.prompt_token_ids)), str(len(completion.token_ids)),
                          f"{ttft * 1000:.0f} ms", f"{decode_rate:.1f}", str(completion.finish_reason))
    console.print(table)
    return 0


def _run_timed(llm, prompts, params):
    """Generate while timing the first token and the decode rate of each request."""
    start = time.perf_counter()
    first: dict[str, float] = {}
    results = {}
    for out in llm.stream(prompts, params):
        now = time.perf_counter()
        first.setdefault(out.request_id, now)
        if out.finished:
            results[out.request_id] = (out, now)
    rows = []
    for request_id in sorted(results, key=int):
        out, done = results[request_id]
        new_tokens = max(len(c.token_ids) for c in out.outputs)
        ttft = first[request_id] - start
        rate = (new_tokens - 1) / (done - first[request_id]) if new_tokens > 1 and done > first[request_id] else 0.0
        rows.append((out, ttft, rate))
    return rows


def cmd_chat(args) -> int:
    llm = _make_llm(args)
    params = sampling_options(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        history.append({"role": "user", "content": user})
        prompt = {"prompt_token_ids": llm.encode_chat(history)}
        shown = 0
        text = ""
        for out in llm.stream(prompt, params):
            text = out.outputs[0].text
            print(text[shown:], end="", flush=True)
            shown = len(text)
        print()
        history.append({"role": "assistant", "content": text})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
