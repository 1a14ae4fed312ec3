"""GGUF matmul kernels on SmolLM2-135M's shapes: sprintllm's C kernels against torch paths.

    python -m bench.bench_kernels [--quick] [--threads 2] [--out docs/bench_kernels.md]

For each weight shape (Q4_1 linear layers, the Q8_0 lm head) and batch M in {1, 8, 64}:

- packed: `GGUFWeight` (Q4_1/Q8_0 repacked into 16-row groups; activations quantized per 32,
  AVX-512 VNNI dots) -- "packed hot" the same on one cache-resident copy
- rows: `gguf_matmul` on the GGUF rows as stored (same arithmetic, per-row kernel)
- dense: the C kernels dequantize to bf16, then torch `F.linear` in bf16 (the large-M path)
- torch fp32 / bf16: sprintllm.quant.gguf.dequantize (torch ops) + `F.linear`, every call
- int4pack: `torch._weight_int4pack_mm_for_cpu` on an exact repack of Q4_1
  (w = d q + m = (q - 8) d + (m + 8 d), torch's (q - 8) * scale + zero with float32 scales)
- int8pack: `torch._weight_int8pack_mm` for Q8_0, after requantizing to one scale per
  output row (the op has no per-block scales, so this is an approximation of the weights)
- compiled: `torch.compile` (inductor, C++ codegen) of the torch fp32 path, dequantization
  and matmul in one graph, fixed shapes (compile time not counted; reported in the table)

Weights are "cold": every call uses the next of several copies that together exceed the
32 MiB L3, as in decode, where one token streams all ~96 MB of weights from DRAM. A time is
the median of individually timed calls; GB/s = the GGUF weight bytes of the shape / that time.
The decode estimate times the matmul sequence of one whole SmolLM2 token (30 layers of
distinct random weights + lm head, fused qkv and gate_up): the best of repeated tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from sprintllm.kernels import ops
from sprintllm.quant.gguf import dequantize as torch_dequantize

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
SHAPES = [  # (name, qtype, N, K)
    ("q / o proj", T.Q4_1, HIDDEN, HIDDEN),
    ("k / v proj", T.Q4_1, KV, HIDDEN),
    ("gate+up", T.Q4_1, 2 * INTER, HIDDEN),
    ("down", T.Q4_1, HIDDEN, INTER),
    ("lm head", T.Q8_0, VOCAB, HIDDEN),
]
EXTRA_SHAPES = [("qkv fused", T.Q4_1, HIDDEN + 2 * KV, HIDDEN), ("gate / up", T.Q4_1, INTER, HIDDEN)]
COLD_BYTES = 96 << 20  # > 3x the L3


def random_rows(qtype: T, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random rows of any kernel type; every fp16 field set to a small finite scale."""
    block, size = ops.KERNEL_TYPES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    f16 = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q4_1: [0, 2], T.Q5_1: [0, 2]}.get(qtype, [0])
    for off in f16:
        raw[..., off:off + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def copies_for(nbytes: int, cold: bool) -> int:
    return max(2, -(-COLD_BYTES // nbytes)) if cold else 1


def timeit(fn, states: list, min_time: float, stat=statistics.median, max_calls: int = 5000) -> float:
    """`stat` (median) of individually timed calls, cycling through `states`, for at least
    min_time and 5 calls. Timing calls one by one keeps an OS preemption (other jobs on
    the two cores) to the calls it hits instead of spoiling a whole batch."""
    fn(states[0])  # warm-up (first-use build, allocator, oneDNN primitive cache)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_calls):
        state = states[len(times) % len(states)]
        t0 = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - t0)
    return stat(times)


@contextlib.contextmanager
def forced(path: str):
    """Make every kernel take the int8 path ("int8") or the bf16 GEMM path ("dense")."""
    saved = dict(ops.DENSE_MIN_ROWS)
    ops.DENSE_MIN_ROWS.update({key: 1 << 30 if path == "int8" else 1 for key in saved})
    try:
        yield
    finally:
        ops.DENSE_MIN_ROWS.update(saved)


def int4pack(raw: torch.Tensor, qtype: T, n: int, k: int):
    """Exact repack of Q4_1 rows for torch's int4pack CPU kernel: (packed, scales_and_zeros)."""
    blocks = raw.reshape(n, k // 32, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    qs = blocks[..., 4:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k).to(torch.int32)  # low nibbles first
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.stack([d, m + 8 * d], dim=-1).squeeze(-2).transpose(0, 1).contiguous()
    return packed, scales_zeros


def int8pack(raw: torch.Tensor, qtype: T, n: int, k: int):
    """Q8_0 requantized to int8 with one scale per row (torch's int8pack layout)."""
    w = torch_dequantize(raw, qtype, (n, k))
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def bench_shape(qtype, n, k, m, args, rng) -> dict:
    raw0 = random_rows(qtype, n, k, rng)
    nbytes = raw0.numel()
    cold = [raw0] + [raw0.clone() for _ in range(copies_for(nbytes, True) - 1)]
    weights = [ops.GGUFWeight(r, qtype, n, k) for r in cold]
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    res = {"bytes": nbytes}
    with forced("int8"):
        res["packed"] = timeit(lambda w: w(x, out=out), weights, args.min_time)
        res["packed hot"] = timeit(lambda w: w(x, out=out), weights[:1], args.min_time)
        res["rows"] = timeit(lambda r: ops.gguf_matmul(x, r, qtype, n, k, out=out), cold, args.min_time)
    with forced("dense"):
        res["dense"] = timeit(lambda w: w(x), weights, args.min_time)
    del weights
    few = cold[:2]  # dequantizing in torch takes far longer than the weights take to stream
    res["torch fp32"] = timeit(lambda r: F.linear(x, torch_dequantize(r, qtype, (n, k))), few, args.min_time)
    xb = x.bfloat16()
    res["torch bf16"] = timeit(lambda r: F.linear(xb, torch_dequantize(r, qtype, (n, k), torch.bfloat16)), few,
                               args.min_time)
    compiled = torch.compile(lambda x, r: F.linear(x, torch_dequantize(r, qtype, (n, k))), dynamic=False)
    start = time.perf_counter()
    compiled(x, few[0])
    res["compile s"] = time.perf_counter() - start
    res["compiled"] = timeit(lambda r: compiled(x, r), cold, args.min_time)
    if qtype == T.Q4_1:
        packs = [int4pack(r, qtype, n, k) for r in cold]
        res["int4pack"] = timeit(lambda p: torch._weight_int4pack_mm_for_cpu(x, p[0], 32, p[1]), packs, args.min_time)
    if qtype == T.Q8_0:
        packs = [int8pack(r, qtype, n, k) for r in cold[: copies_for(n * k, True)]]
        res["int8pack"] = timeit(lambda p: torch._weight_int8pack_mm(x, p[0], p[1]), packs, args.min_time)
    return res


def call_overhead(args) -> dict:
    """Per-call cost on a tiny problem (M = 1, N = 4, K = 32: no work), from Python."""
    rng = np.random.default_rng(1)
    raw = random_rows(T.Q4_1, 4, 32, rng)
    weight = ops.GGUFWeight(raw, T.Q4_1, 4, 32)
    x, out = torch.randn(1, 32), torch.empty(1, 4)
    lib = ops.kernels()
    plan_args = (weight._plan_addr, x.data_ptr(), 1, out.data_ptr(), 4, 0)
    return {
        "GGUFWeight(x, out=out)": timeit(lambda _: weight(x, out=out), [0], args.min_time),
        "GGUFWeight(x)": timeit(lambda _: weight(x), [0], args.min_time),
        "gguf_matmul(x, raw, ..., out=out)": timeit(lambda _: ops.gguf_matmul(x, raw, T.Q4_1, 4, 32, out=out), [0],
                                                    args.min_time),
        "bare ctypes sl_plan_matmul (C work included)": timeit(lambda _: lib.plan_matmul(*plan_args), [0],
                                                               args.min_time),
        "torch.empty(1, 4), for scale": timeit(lambda _: torch.empty(1, 4), [0], args.min_time),
    }


def decode_token(args) -> dict:
    """One SmolLM2 decode token's matmuls (M = 1): 30 layers of distinct random weights,
    fused qkv and gate_up, + the lm head: 121 calls over 96 MB, as GGUFWeight calls."""
    rng = np.random.default_rng(2)
    shapes = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    layers = [[ops.GGUFWeight(random_rows(T.Q4_1, n, k, rng), T.Q4_1, n, k) for n, k in shapes]
              for _ in range(LAYERS)]
    head = ops.GGUFWeight(random_rows(T.Q8_0, VOCAB, HIDDEN, rng), T.Q8_0, VOCAB, HIDDEN)
    total = sum(w.data.numel() for layer in layers for w in layer) + head.data.numel()
    bufs = {n: torch.empty(1, n) for n in (HIDDEN + 2 * KV, HIDDEN, 2 * INTER, VOCAB)}
    xs = {HIDDEN: torch.randn(1, HIDDEN), INTER: torch.randn(1, INTER)}

    def run_layers(_):
        for layer in layers:
            for w in layer:
                w(xs[w.K], out=bufs[w.N])

    def token(_):
        run_layers(_)
        head(xs[HIDDEN], out=bufs[VOCAB])

    t = timeit(token, [0], args.min_time * 4, stat=min)
    t_layers = timeit(run_layers, [0], args.min_time * 4, stat=min)
    return {"token": t, "layers": t_layers, "head": t - t_layers, "bytes": total, "calls": 4 * LAYERS + 1}


def all_types(args) -> dict:
    """Every kernel type at M = 1 on a 2048 x 2048 weight, cold: GGUFWeight (packed where
    the type packs) and gguf_matmul on GGUF rows."""
    rng = np.random.default_rng(4)
    table = {}
    for qtype in ops.KERNEL_TYPES:
        raws = [random_rows(qtype, 2048, 2048, rng)]
        raws += [raws[0].clone() for _ in range(copies_for(raws[0].numel(), True) - 1)]
        weights = [ops.GGUFWeight(r, qtype, 2048, 2048) for r in raws]
        x, out = torch.randn(1, 2048), torch.empty(1, 2048)
        table[qtype] = {
            "bytes": raws[0].numel(),
            "packed": timeit(lambda w: w(x, out=out), weights, args.min_time) if weights[0].packed else None,
            "rows": timeit(lambda r: ops.gguf_matmul(x, r, qtype, 2048, 2048, out=out), raws, args.min_time),
        }
    return table


CROSSOVER_ROWS = [4, 8, 16, 32, 64, 128, 256, 512]


def crossover(args) -> dict:
    """int8 kernels against dequantize-to-bf16 + torch GEMM over M (hot weights): what
    DENSE_MIN_ROWS is set from. SmolLM2's gate_up (packed Q4_1), and a 2048 x 2048 weight
    per k-quant on the GGUF-rows kernel (no SmolLM2 weight is a k-quant)."""
    rng = np.random.default_rng(3)
    cases = {"gate+up Q4_1 packed (3072 x 576)": ops.GGUFWeight(random_rows(T.Q4_1, 2 * INTER, HIDDEN, rng), T.Q4_1,
                                                                 2 * INTER, HIDDEN)}
    for qtype in (T.Q4_K, T.Q6_K):
        cases[f"{qtype.name} rows (2048 x 2048)"] = ops.GGUFWeight(random_rows(qtype, 2048, 2048, rng), qtype,
                                                                   2048, 2048)
    table = {}
    for name, w in cases.items():
        for m in CROSSOVER_ROWS:
            x = torch.randn(m, w.K)
            with forced("int8"):
                t8 = timeit(lambda _: w(x), [0], args.min_time / 4)
            with forced("dense"):
                td = timeit(lambda _: w(x), [0], args.min_time / 4)
            table[(name, m)] = (t8, td)
    return table


METHODS = {  # column -> what it times
    "packed": "sprintllm GGUFWeight (repacked Q4_1/Q8_0, int8 VNNI)",
    "packed hot": "the same, one weight copy (cache-resident)",
    "rows": "sprintllm gguf_matmul on GGUF rows (int8 VNNI)",
    "dense": "sprintllm dequant -> bf16 (C) + F.linear bf16",
    "torch fp32": "sprintllm.quant.gguf dequantize (torch) + F.linear fp32",
    "torch bf16": "the same in bf16",
    "int4pack": "torch._weight_int4pack_mm_for_cpu, exact Q4_1 repack",
    "int8pack": "torch._weight_int8pack_mm, per-row requantized Q8_0 (approximate)",
    "compiled": "torch.compile of torch fp32 (dequantize + F.linear in one graph)",
}


def fmt(t: float | None, nbytes: int) -> str:
    return "—" if t is None else f"{t * 1e6:,.0f} µs ({nbytes / t / 1e9:.1f})"


def markdown(results: dict, extra: dict, overhead: dict, decode: dict, types: dict, cross: dict, args,
             meta: dict) -> str:
    lines = [
        "# GGUF matmul kernels (sprintllm.kernels)", "",
        f"`python -m bench.bench_kernels{' --quick' if args.quick else ''} --threads {args.threads}` — "
        f"{meta['date']}, {meta['cpu']}, torch {torch.__version__}, {args.threads} threads; "
        f"load average {meta['load_before']} before, {meta['load_after']} after (the host may be shared; "
        "per-shape times are medians of single calls, the token time the best of repeated tokens). "
        f"The kernels' contention guard (one thread for a while after a 2-thread call stalled on the OS "
        f"scheduler) tripped {meta['backoffs']} times during the run.", "",
        "Each cell: time per call (effective GB/s of the GGUF weight bytes). Weights are cold (copies cycled "
        "past the 32 MiB L3, as decode streams all 96 MB per token) unless marked hot. Exactness: `int8pack` "
        "approximates the weights (one scale per row instead of per 32); all others use the exact GGUF weights: "
        "packed and rows round the activations to int8 per 32 values (as llama.cpp does), dense and torch bf16 "
        "round weights and activations to bf16, torch fp32 and int4pack compute in float32.", "",
        "| column | what |", "|---|---|",
    ]
    lines += [f"| {name} | {what} |" for name, what in METHODS.items()]
    lines.append("")
    for m in args.rows:
        lines += [f"## M = {m}", "", "| shape (N x K) | type | " + " | ".join(METHODS) + " |",
                  "|---|---|" + "---|" * len(METHODS)]
        for shape in SHAPES:
            res = results[(shape, m)]
            cells = [fmt(res.get(meth), res["bytes"]) for meth in METHODS]
            cells[-1] += f" [compile {res['compile s']:.0f} s]"
            lines.append(f"| {shape[0]} ({shape[2]} x {shape[3]}) | {shape[1].name} | " + " | ".join(cells) + " |")
        lines.append("")
    packed = {s[0]: results[(s, 1)]["packed"] for s in SHAPES}
    qkv, gate = extra[EXTRA_SHAPES[0]][0], extra[EXTRA_SHAPES[1]][0]
    fused = qkv + packed["q / o proj"] + packed["gate+up"] + packed["down"]
    split = 2 * packed["q / o proj"] + 2 * packed["k / v proj"] + 2 * gate + packed["down"]
    head = packed["lm head"]
    lines += [
        "## Decode: matmul time per SmolLM2 token (M = 1, packed)", "",
        f"- qkv fused ({HIDDEN + 2 * KV} x {HIDDEN}): {fmt(qkv, extra[EXTRA_SHAPES[0]][1])}; "
        f"gate or up alone ({INTER} x {HIDDEN}): {fmt(gate, extra[EXTRA_SHAPES[1]][1])}.",
        f"- From the per-shape times: fused qkv + o + gate_up + down = {fused * 1e6:,.0f} µs per layer "
        f"(unfused q, k, v, o, gate, up, down: {split * 1e6:,.0f} µs); x {LAYERS} + lm head "
        f"{head * 1e6:,.0f} µs = **{(LAYERS * fused + head) * 1e3:.2f} ms** per token "
        f"(unfused {(LAYERS * split + head) * 1e3:.2f} ms).",
        f"- Measured end to end, the {decode['calls']} calls of one token on distinct weights "
        f"({decode['bytes'] / 1e6:.1f} MB): **{decode['token'] * 1e3:.2f} ms** per token "
        f"({decode['bytes'] / decode['token'] / 1e9:.1f} GB/s; layers {decode['layers'] * 1e3:.2f} ms, lm head "
        f"{decode['head'] * 1e3:.2f} ms). A whole token at 240 tok/s takes 4.17 ms "
        "(docs/bench_gguf.md has the engines' end-to-end numbers).", "",
        "## Every kernel type (M = 1, 2048 x 2048, cold)", "",
        "| type | GGUFWeight (packed) | gguf_matmul (GGUF rows) |", "|---|---|---|"]
    for qtype, res in types.items():
        lines.append(f"| {qtype.name} | {fmt(res['packed'], res['bytes'])} | {fmt(res['rows'], res['bytes'])} |")
    lines += [
        "",
        "## Crossover: int8 kernels against dequantize-to-bf16 + torch GEMM (hot weights)", "",
        "int8 µs / dense µs per call; `DENSE_MIN_ROWS` in sprintllm/kernels/ops.py follows these.", "",
        "| weight | " + " | ".join(f"M={m}" for m in CROSSOVER_ROWS) + " |", "|---|" + "---|" * len(CROSSOVER_ROWS)]
    for name in dict.fromkeys(k[0] for k in cross):
        cells = [f"{cross[(name, m)][0] * 1e6:,.0f} / {cross[(name, m)][1] * 1e6:,.0f}" for m in CROSSOVER_ROWS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Call overhead (M = 1, N = 4, K = 32: no work)", "", "| call | µs |", "|---|---|"]
    lines += [f"| {name} | {t * 1e6:.2f} |" for name, t in overhead.items()]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="short timings, written under build/bench-quick/")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.rows = [1, 8, 64]
    args.min_time = 0.05 if args.quick else 0.5
    out = args.out or (Path("build/bench-quick/bench_kernels.md") if args.quick else Path("docs/bench_kernels.md"))
    torch.set_num_threads(args.threads)
    if not ops.available():
        raise SystemExit("the C kernels are not available (see the warning above)")
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": _load(),
            "cpu": f"{_cpu_name()} ({os.cpu_count()} cores, {platform.machine()})"}
    rng = np.random.default_rng(0)
    decode = decode_token(args)
    print(f"decode token: {decode['token'] * 1e3:.2f} ms", flush=True)
    results = {}
    for shape in SHAPES:
        for m in args.rows:
            results[(shape, m)] = res = bench_shape(shape[1], shape[2], shape[3], m, args, rng)
            print(shape[0], f"M={m}", {k: f"{v * 1e6:.0f}us" for k, v in res.items() if k != "bytes"}, flush=True)
    extra = {}
    for shape in EXTRA_SHAPES:
        _, qtype, n, k = shape
        raws = [random_rows(qtype, n, k, rng)]
        raws += [raws[0].clone() for _ in range(copies_for(raws[0].numel(), True) - 1)]
        weights = [ops.GGUFWeight(r, qtype, n, k) for r in raws]
        x, y = torch.randn(1, k), torch.empty(1, n)
        extra[shape] = (timeit(lambda w: w(x, out=y), weights, args.min_time), raws[0].numel())
    overhead = call_overhead(args)
    types = all_types(args)
    cross = crossover(args)
    meta["load_after"] = _load()
    meta["backoffs"] = ops.kernels().contention_backoffs()
    text = markdown(results, extra, overhead, decode, types, cross, args, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
