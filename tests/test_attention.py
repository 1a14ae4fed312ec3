"""Attention backends against plain dense causal attention on random data."""
import pytest
import torch

from sprintllm.attention import AttentionMetadata, get_attention_backend, write_kv_cache
from sprintllm.attention.paged import PagedAttention

BLOCK_SIZE = 4


def dense_attention(q, k, v, scale, sliding_window):
    """Attention of the last q.shape[0] positions of one sequence over all of its k/v [S, Hkv, D]."""
    seq_len, query_len = k.shape[0], q.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def make_batch(seqs, num_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0, table_pad=2):
    """seqs: (context_len, query_len) per sequence. Fills a paged cache with every sequence's
    keys (context and new tokens) on shuffled, non-contiguous blocks, as a model layer would.
    Block tables get `table_pad` unused columns beyond the longest sequence's blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-(c + q) // BLOCK_SIZE) for c, q in seqs]
    num_blocks = sum(blocks_per_seq) + 5
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + table_pad
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)

    qs, dense_k, dense_v, slots = [], [], [], []
    for b, ((context_len, query_len), n) in enumerate(zip(seqs, blocks_per_seq)):
        table = [free.pop() for _ in range(n)]
        block_tables[b, :n] = torch.tensor(table)
        seq_len = context_len + query_len
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        dense_k.append(k)
        dense_v.append(v)
        qs.append(torch.randn(query_len, num_heads, head_dim, generator=gen).to(dtype))
        slots.append(torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len)]))

    # The context was written by earlier steps, this step's tokens by the layer itself.
    for k, v, s, (context_len, _) in zip(dense_k, dense_v, slots, seqs):
        write_kv_cache(k[:context_len], v[:context_len], k_cache, v_cache, s[:context_len])
    new_slots = torch.cat([s[c:] for s, (c, _) in zip(slots, seqs)])
    write_kv_cache(torch.cat([k[c:] for k, (c, _) in zip(dense_k, seqs)]),
                   torch.cat([v[c:] for v, (c, _) in zip(dense_v, seqs)]), k_cache, v_cache, new_slots)

    query_lens = [q for _, q in seqs]
    seq_lens = [c + q for c, q in seqs]
    meta = AttentionMetadata(
        slot_mapping=new_slots,
        query_start_loc=torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        query_lens_list=query_lens,
        seq_lens_list=seq_lens,
        block_size=BLOCK_SIZE,
    )
    return torch.cat(qs), k_cache, v_cache, meta, (qs, dense_k, dense_v)


MIXED = [(0, 7), (10, 6), (12, 1), (0, 1), (25, 1), (3, 9), (0, 2)]
DECODE = [(n, 1) for n in (0, 3, 4, 7, 15, 16, 30, 41)]
HEADS = [(4, 2, 64), (4, 1, 80), (3, 3, 64), (8, 2, 80)]  # GQA, MQA, MHA
BACKENDS = {
    "reference": lambda: get_attention_backend("reference"),
    "paged": lambda: get_attention_backend("paged"),
    # Decode sequences attended in groups of one to three instead of all at once.
    "paged-grouped": lambda: PagedAttention(gather_bytes=20_000),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("sliding_window", [None, 1, 5, 9, 100])
@pytest.mark.parametrize("table_pad", [0, 2])
def test_backend_matches_dense(backend, seqs, heads, sliding_window, table_pad):
    num_heads, num_kv_heads, head_dim = heads
    q, k_cache, v_cache, meta, (qs, ks, vs) = make_batch(seqs, num_heads, num_kv_heads, head_dim,
                                                         table_pad=table_pad)
    scale = head_dim ** -0.5
    out = BACKENDS[backend]().forward(q, k_cache, v_cache, meta, scale, sliding_window)
    expected = torch.cat([dense_attention(qb, kb, vb, scale, sliding_window) for qb, kb, vb in zip(qs, ks, vs)])
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["paged", "paged-grouped"])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_paged_bf16_close_to_reference(backend, seqs, sliding_window):
    q, k_cache, v_cache, meta, _ = make_batch(seqs, 8, 2, 64, dtype=torch.bfloat16, seed=1)
    ref = get_attention_backend("reference").forward(q, k_cache, v_cache, meta, 0.125, sliding_window)
    out = BACKENDS[backend]().forward(q, k_cache, v_cache, meta, 0.125, sliding_window)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_window_sees_exactly_the_last_w_keys():
    # Values are one-hot in the key position, so the output shows which keys got weight.
    seq_len, window = 11, 3
    k_cache = torch.zeros(4, BLOCK_SIZE, 1, 16)
    v_cache = torch.zeros_like(k_cache)
    v = torch.zeros(seq_len, 1, 16)
    v[torch.arange(seq_len), 0, torch.arange(seq_len)] = 1.0
    slots = torch.arange(seq_len)
    write_kv_cache(torch.zeros(seq_len, 1, 16), v, k_cache, v_cache, slots)
    meta = AttentionMetadata(slots[-1:], torch.tensor([0, 1], dtype=torch.int32),
                             torch.tensor([seq_len], dtype=torch.int32),
                             torch.arange(3, dtype=torch.int32)[None], [1], [seq_len], BLOCK_SIZE)
    for backend in BACKENDS.values():
        out = backend().forward(torch.zeros(1, 1, 16), k_cache, v_cache, meta, 1.0, window)
        expected = torch.zeros(16)
        expected[seq_len - window:seq_len] = 1.0 / window  # keys 8, 9, 10 for the query at 10
        torch.testing.assert_close(out[0, 0], expected)


def test_write_kv_cache_skips_negative_slots():
    k_cache = torch.zeros(2, BLOCK_SIZE, 1, 2)
    v_cache = torch.zeros_like(k_cache)
    k = torch.arange(1.0, 7.0).view(3, 1, 2)
    write_kv_cache(k, -k, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    assert torch.equal(flat_k[5, 0], torch.tensor([1.0, 2.0]))
    assert torch.equal(flat_k[0, 0], torch.tensor([5.0, 6.0]))
    assert torch.equal(flat_v[0, 0], torch.tensor([-5.0, -6.0]))
    assert int((flat_k != 0).any(-1).sum()) == 2  # nothing else was written


def test_unknown_backend():
    with pytest.raises(ValueError, match="paged, reference"):
        get_attention_backend("nope")
