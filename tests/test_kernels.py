"""sprintllm's C GGUF matmul kernels against exact products on dequantized weights.

The int8 path quantizes each activation to the nearest multiple of d = amax / 127 of its
block (32 values; 256 for k-quants), so against x @ W^T in float64 its error is at most
`error_bound` = sum over blocks of amax / 254 * sum |w| (llama.cpp has the same error, plus
an fp16 rounding of d that we avoid). Two checks per case:
- the bound, with a float32 accumulation slack of 1e-5 * sum |x| |w|;
- a tight one against an emulation of that activation rounding in torch (same float32
  arithmetic), which catches errors far below the bound (a wrong scale in one block).
Both the AVX-512 build and the portable scalar build (-mno-avx512f) run every case.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from sprintllm.kernels import build, ops
from sprintllm.quant.gguf import dequantize as torch_dequantize
from tests.test_gguf_dequant import random_blocks

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
PACKED = [T.Q4_0, T.Q4_1, T.Q8_0]
KQUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
N = 37  # odd, and not a multiple of the 4-row tiles
ROWS = [1, 3, 17]


def _load(portable: bool) -> ops._Kernels:
    try:
        return ops._Kernels(build.load_library(portable=portable))
    except build.KernelBuildError as exc:
        pytest.skip(f"C kernels cannot be built here: {str(exc).splitlines()[0]}")


@pytest.fixture(scope="module", params=["simd", "portable"])
def lib(request):
    return _load(request.param == "portable")


@pytest.fixture
def use(monkeypatch):
    """Route sprintllm.kernels through the given library (None: the torch fallback), on the
    int8 path at every M (tests of the bf16 GEMM path lower DENSE_MIN_ROWS themselves)."""
    def select(kernels):
        monkeypatch.setattr(ops, "_kernels", kernels)
        monkeypatch.setattr(ops, "_load_failed", kernels is None)
        monkeypatch.setattr(ops, "DENSE_MIN_ROWS", dict.fromkeys(ops.DENSE_MIN_ROWS, 1 << 30))
    return select


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def legacy_weights(qtype: T, n: int, k: int, seed: int) -> torch.Tensor:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(quants.quantize(w, qtype)).view(np.uint8))


def emulate(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """x @ w.T with x rounded exactly as the C kernels round it, in float64."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    # A tensor / tensor division: torch computes `127 / amax` as 127 * (1 / amax), which
    # rounds differently from C's 127.0f / amax and flips ties like x = amax / 2.
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv) * (amax / 127)
    return xq.reshape(m, k).double() @ w.double().T


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, qtype: T) -> None:
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[0])
    scale = x.double().abs() @ w.double().abs().T
    exact = x.double() @ w.double().T
    bound = ops.error_bound(x, w, qtype) + 1e-5 * scale
    assert ((y.double() - exact).abs() <= bound).all()
    assert torch.allclose(y.double(), emulate(x, w, ops.KERNEL_TYPES[qtype][0]), rtol=0, atol=1e-5 * scale.max())


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [96, 608], ids=lambda k: f"K{k}")  # 608 = 19 blocks, not a multiple of 256
def test_legacy_quantized_weights(lib, use, qtype, k):
    use(lib)
    raw = legacy_weights(qtype, N, k, seed=k + qtype.value)
    w = torch_dequantize(raw, qtype, (N, k))
    for m in ROWS:
        x = randn(m, k, seed=m)
        check(ops.gguf_matmul(x, raw, qtype, N, k), x, w, qtype)


@pytest.mark.parametrize("qtype", KQUANTS + LEGACY, ids=lambda t: t.name)
def test_random_valid_blocks(lib, use, qtype):
    """Every bit pattern of quants and sub-block scales, not only what a quantizer writes."""
    use(lib)
    block = ops.KERNEL_TYPES[qtype][0]
    blocks = 3 if block == 256 else 11
    k = blocks * block
    raw = torch.from_numpy(random_blocks(qtype, (N, blocks), seed=qtype.value))
    w = torch_dequantize(raw, qtype, (N, k))
    for m in ROWS:
        x = randn(m, k, seed=m) * torch.linspace(0.01, 4, k)  # blocks of very different scales
        check(ops.gguf_matmul(x, raw, qtype, N, k), x, w, qtype)


def test_zero_blocks_and_bf16_input(lib, use):
    use(lib)
    raw = legacy_weights(T.Q4_1, N, 128, seed=0)
    x = randn(3, 128)
    x[1, 32:64] = 0  # an all-zero activation block: scale 0, no division by zero
    x = x.bfloat16()
    y = ops.gguf_matmul(x, raw, T.Q4_1, N, 128)
    assert torch.equal(y, ops.gguf_matmul(x.float(), raw, T.Q4_1, N, 128))
    check(y, x.float(), torch_dequantize(raw, T.Q4_1, (N, 128)), T.Q4_1)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(lib, use, qtype):
    use(lib)
    block = ops.KERNEL_TYPES[qtype][0]
    raw = torch.from_numpy(random_blocks(qtype, (N, 2), seed=7))
    expected = torch_dequantize(raw, qtype, (N, 2 * block))
    assert torch.equal(ops.dequantize(raw, qtype, N, 2 * block), expected)
    assert torch.equal(ops.dequantize(raw, qtype, N, 2 * block, torch.bfloat16), expected.bfloat16())


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "fallback"])
def test_rows_gather_an_embedding(lib, use, qtype, kernels):
    """GGUFWeight.rows: the dequantized rows asked for, packed or not, in any order, repeated."""
    use(lib if kernels else None)
    block = ops.KERNEL_TYPES[qtype][0]
    raw = torch.from_numpy(random_blocks(qtype, (N, 2), seed=11))
    weight = ops.GGUFWeight(raw, qtype, N, 2 * block)
    ids = torch.tensor([36, 0, 17, 17, 5])
    expected = torch_dequantize(raw, qtype, (N, 2 * block))[ids]
    assert torch.equal(weight.rows(ids), expected)
    assert torch.equal(weight.rows(ids, torch.bfloat16), expected.bfloat16())
    if kernels:
        with pytest.raises(IndexError, match="out of range"):
            weight.rows(torch.tensor([N]))


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [96, 608], ids=lambda k: f"K{k}")
def test_packed_weight(lib, use, qtype, k):
    """GGUFWeight repacks Q4_0/Q4_1/Q8_0 (16-row groups; N = 37 pads the last group)."""
    use(lib)
    raw = torch.from_numpy(random_blocks(qtype, (N, k // 32), seed=k))
    w = torch_dequantize(raw, qtype, (N, k))
    weight = ops.GGUFWeight(raw, qtype, N, k)
    assert weight.packed and weight.data.numel() == 3 * 16 * raw.shape[1]  # GGUF bytes, padded to 48 rows
    for m in ROWS:
        x = randn(m, k, seed=m) * torch.linspace(0.01, 4, k)
        check(weight(x), x, w, qtype)
    assert torch.equal(weight.raw(), raw)
    assert torch.equal(weight.dequantize(), w)
    assert torch.equal(weight.dequantize(torch.bfloat16), w.bfloat16())
    twin = copy.deepcopy(weight)  # must bind its own bytes, not the original's
    assert twin.data.data_ptr() != weight.data.data_ptr()
    del weight
    assert torch.equal(twin.raw(), raw)


def test_weight_of_unpacked_types(use):
    use(_load(False))
    raw = torch.from_numpy(random_blocks(T.Q6_K, (N, 2), seed=3))  # a kernel type without packing
    weight = ops.GGUFWeight(raw, T.Q6_K, N, 512)
    assert not weight.packed and weight.data is raw
    x = randn(5, 512).bfloat16()
    out = torch.empty(5, N)
    assert weight(x, out=out) is out
    assert torch.equal(out, ops.gguf_matmul(x, raw, T.Q6_K, N, 512))
    raw2 = torch.from_numpy(random_blocks(T.Q2_K, (N, 1), seed=1))  # no C kernel: torch
    x2 = randn(2, 256)
    expected = x2 @ torch_dequantize(raw2, T.Q2_K, (N, 256)).T
    assert torch.allclose(ops.GGUFWeight(raw2, T.Q2_K, N, 256)(x2), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \[M, 512\]"):
        weight(randn(2, 256))


def test_strided_rows_and_out(use):
    use(_load(False))
    full = legacy_weights(T.Q8_0, N, 256, seed=3)  # rows of 272 bytes; use the first 4 blocks
    raw = full[:, : 4 * 34]
    assert not raw.is_contiguous()
    w = torch_dequantize(raw.contiguous(), T.Q8_0, (N, 128))
    x = randn(2, 128)
    out = torch.full((2, N), float("nan"))
    assert ops.gguf_matmul(x, raw, T.Q8_0, N, 128, out=out) is out
    check(out, x, w, T.Q8_0)
    # Outputs of two weights side by side in one buffer (e.g. q, k, v of different types).
    both = torch.full((2, 2 * N + 3), float("nan"))
    ops.gguf_matmul(x, raw, T.Q8_0, N, 128, out=both[:, :N])
    ops.GGUFWeight(raw, T.Q8_0, N, 128)(x, out=both[:, N + 3:])
    assert torch.equal(both[:, :N], out) and both[:, N:N + 3].isnan().all()
    check(both[:, N + 3:], x, w, T.Q8_0)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_large_batch_uses_bf16_gemm(use, monkeypatch, packed):
    use(_load(False))
    qtype, k = (T.Q4_1, 64) if packed else (T.Q4_K, 256)
    m = 70
    monkeypatch.setitem(ops.DENSE_MIN_ROWS, "packed" if packed else qtype, m - 5)
    raw = torch.from_numpy(random_blocks(qtype, (N, k // ops.KERNEL_TYPES[qtype][0]), seed=5))
    w = torch_dequantize(raw, qtype, (N, k))
    x = randn(m, k)
    y = ops.GGUFWeight(raw, qtype, N, k)(x) if packed else ops.gguf_matmul(x, raw, qtype, N, k)
    # bf16 rounds weights and activations (2^-9 relative each) and the output (2^-9).
    scale = x.double().abs() @ w.double().abs().T
    exact = x.double() @ w.double().T
    assert ((y.double() - exact).abs() <= 2**-8 * scale + 2**-9 * exact.abs() + 1e-5 * scale).all()


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K], ids=lambda t: t.name)
def test_thread_count_does_not_change_results(use, qtype):
    """Rows are split between threads (in dynamic chunks); each output is computed by one
    thread in a fixed order, so the result cannot depend on the split."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs a single thread here")
    use(_load(False))
    n, k = 4003, 512  # > 384 KiB of weights: runs on all threads; a ragged last chunk
    raw = torch.from_numpy(random_blocks(qtype, (n, k // ops.KERNEL_TYPES[qtype][0]), seed=1))
    weight = ops.GGUFWeight(raw, qtype, n, k)
    x = randn(3, k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gguf_matmul(x, raw, qtype, n, k), weight(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops.gguf_matmul(x, raw, qtype, n, k), one[0])
    assert torch.equal(weight(x), one[1])
    check(one[1], x, torch_dequantize(raw, qtype, (n, k)), qtype)


def test_one_openmp_runtime():
    """Our libgomp.so.1 must bind to the copy torch loaded: two runtimes means two thread
    pools spinning against each other on the same cores. (Other wheels may bring their own
    renamed copies, e.g. sentencepiece's libgomp-<hash>.so.1; those are theirs.)"""
    _load(False)
    maps = open("/proc/self/maps").read()
    gomp = {line.split()[-1] for line in maps.splitlines() if line.endswith("/libgomp.so.1")}
    assert len(gomp) == 1, gomp


def test_fallback_matches_kernels(use):
    raw = legacy_weights(T.Q4_1, N, 576, seed=2)
    w = torch_dequantize(raw, T.Q4_1, (N, 576))
    x = randn(3, 576)
    use(_load(False))
    fast = ops.gguf_matmul(x, raw, T.Q4_1, N, 576)
    use(None)
    assert not ops.available()
    slow = ops.gguf_matmul(x, raw, T.Q4_1, N, 576)
    assert torch.allclose(slow.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)
    assert ((fast - slow).abs().double() <= ops.error_bound(x, w, T.Q4_1) + 1e-4).all()
    weight = ops.GGUFWeight(raw, T.Q4_1, N, 576)
    assert not weight.packed and torch.equal(weight(x), slow)
    assert torch.equal(weight.dequantize(), w)
    # Types without a C kernel take the torch path even when the kernels are loaded.
    use(_load(False))
    raw2 = torch.from_numpy(random_blocks(T.Q2_K, (N, 1), seed=1))
    x2 = randn(2, 256)
    expected = x2 @ torch_dequantize(raw2, T.Q2_K, (N, 256)).T
    assert torch.allclose(ops.gguf_matmul(x2, raw2, T.Q2_K, N, 256), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_clear_errors(use):
    use(_load(False))
    raw = legacy_weights(T.Q4_1, N, 64, seed=0)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        ops.gguf_matmul(randn(2, 32), raw, T.Q4_1, N, 64)
    with pytest.raises(ValueError, match=r"raw must be uint8 \[37, 40\]"):
        ops.gguf_matmul(randn(2, 64), raw[:-1], T.Q4_1, N, 64)
    with pytest.raises(ValueError, match="out must be"):
        ops.gguf_matmul(randn(2, 64), raw, T.Q4_1, N, 64, out=torch.empty(2, N, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        ops.GGUFWeight(raw, T.Q4_1, N, 64)(randn(2, 64), out=torch.empty(N, 2).T)  # columns not contiguous


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPRINTLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ops, "_kernels", None)
    monkeypatch.setattr(ops, "_load_failed", False)
    with pytest.warns(RuntimeWarning, match="C kernels unavailable, using the torch fallback"):
        assert not ops.available()
    assert not ops.available()  # no second build attempt, no second warning
    raw = legacy_weights(T.Q8_0, 5, 64, seed=0)
    x = randn(1, 64)
    assert torch.allclose(ops.gguf_matmul(x, raw, T.Q8_0, 5, 64), x @ torch_dequantize(raw, T.Q8_0, (5, 64)).T)


def test_build_is_cached_by_content(monkeypatch, tmp_path):
    try:
        build.compiler()
    except build.KernelBuildError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("SPRINTLLM_CACHE_DIR", str(tmp_path))
    first = build.build_library()
    mtime = first.stat().st_mtime_ns
    assert build.build_library() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert build.build_library(portable=True) != first  # other flags, other library
    assert not list(tmp_path.glob("*.tmp"))
