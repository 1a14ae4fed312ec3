import itertools
import random

import pytest

from sprintllm.engine import block_manager as bm_module
from sprintllm.engine.block_manager import BlockManager
from sprintllm.engine.request import Request
from sprintllm.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(tokens, request_id=None) -> Request:
    return Request(request_id or f"r{next(_ids)}", list(tokens), SamplingParams())


def fork_request(bm: BlockManager, parent: Request) -> Request:
    child = Request(f"r{next(_ids)}", parent.prompt_token_ids, SamplingParams(), token_ids=list(parent.token_ids))
    child.num_computed_tokens = parent.num_computed_tokens
    bm.fork(parent, child)
    return child


def prefill(bm: BlockManager, req: Request) -> list[tuple[int, int]]:
    """Admit a request the way the scheduler does: prefix lookup, allocate, compute, cache."""
    computed, num_hit = bm.get_computed_blocks(req)
    copies = bm.allocate_slots(req, req.num_tokens - num_hit, computed)
    assert copies is not None
    req.num_cached_tokens = num_hit
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req, req.num_computed_tokens)
    return copies


def decode(bm: BlockManager, req: Request, token: int) -> list[tuple[int, int]] | None:
    """Sample `token`, then allocate and compute it as the next step would."""
    req.append_token(token)
    copies = bm.allocate_slots(req, 1)
    if copies is not None:
        req.num_computed_tokens += 1
        bm.cache_blocks(req, req.num_computed_tokens)
    return copies


def test_reference_counts_up_and_down():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request(range(10))
    assert bm.allocate_slots(a, 10) == []
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in a.block_table)
    assert bm.usage() == pytest.approx(3 / 8)

    a.num_computed_tokens = 10
    child = fork_request(bm, a)
    assert child.block_table == a.block_table
    assert all(bm.ref_count(b) == 2 for b in a.block_table)
    assert bm.num_free_blocks == 5  # sharing takes no new block

    blocks = list(a.block_table)
    bm.free(a)
    assert a.block_table == []
    assert all(bm.ref_count(b) == 1 for b in blocks) and bm.num_free_blocks == 5
    bm.free(child)
    assert all(bm.ref_count(b) == 0 for b in blocks) and bm.num_free_blocks == 8
    assert bm.usage() == 0.0


def test_free_is_a_no_op_on_an_empty_table_and_when_repeated():
    bm = BlockManager(num_blocks=4, block_size=4)
    aborted = make_request(range(5))
    bm.free(aborted)  # aborted before it was ever scheduled
    assert bm.num_free_blocks == 4

    a, b = make_request(range(5)), make_request(range(5))
    prefill(bm, a)
    bm.fork(a, b)
    bm.free(a)
    bm.free(a)  # must not drop b's references a second time
    assert all(bm.ref_count(x) == 1 for x in b.block_table)
    bm.free(b)
    assert bm.num_free_blocks == 4


def test_prefix_hit_shares_full_blocks_of_the_same_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request(range(10))  # blocks: [0..3] [4..7] [8, 9]
    prefill(bm, a)

    b = make_request([*range(10), 50, 51])
    computed, num_hit = bm.get_computed_blocks(b)
    assert computed == a.block_table[:2] and num_hit == 8  # a's partial block is not cached
    assert bm.get_computed_blocks(b) == (computed, num_hit)  # lookup has no side effects
    assert all(bm.ref_count(x) == 1 for x in computed)

    assert bm.allocate_slots(b, b.num_tokens - num_hit, computed) == []
    b.num_computed_tokens = num_hit
    assert b.block_table[:2] == computed and len(b.block_table) == 3
    assert b.block_table[2] not in a.block_table
    assert all(bm.ref_count(x) == 2 for x in computed)


def test_prefix_hit_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request(range(12))  # exactly three full blocks, all cached
    prefill(bm, a)
    same = make_request(range(12))
    computed, num_hit = bm.get_computed_blocks(same)
    assert computed == a.block_table[:2] and num_hit == 8  # not 12: the last block is recomputed
    one_more = make_request(range(13))
    assert bm.get_computed_blocks(one_more) == (a.block_table, 12)
    assert bm.get_computed_blocks(make_request([0])) == ([], 0)


def test_same_block_content_after_a_different_prefix_does_not_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefill(bm, make_request([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert bm.get_computed_blocks(make_request([0, 0, 0, 0, 5, 6, 7, 8, 9])) == ([], 0)
    assert bm.get_computed_blocks(make_request([5, 6, 7, 8, 9])) == ([], 0)
    assert bm.get_computed_blocks(make_request([1, 2, 3, 4, 0, 6, 7, 8, 9]))[1] == 4


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prefill(bm, make_request(range(10)))
    assert bm.get_computed_blocks(make_request(range(10))) == ([], 0)


def test_cached_blocks_outlive_their_request_and_a_hit_takes_them_out_of_the_free_queue():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_request(range(6))
    prefill(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6  # cached but free

    b = make_request([*range(4), 90, 91])
    computed, num_hit = bm.get_computed_blocks(b)
    assert computed == a_blocks[:2] and num_hit == 4
    bm.allocate_slots(b, 2, computed)
    b.num_computed_tokens = 6
    # Two blocks revived from the queue plus one fresh one.
    assert bm.num_free_blocks == 3
    assert all(bm.ref_count(x) == 1 for x in computed)
    # The revived blocks are never handed out again while b holds them.
    other = make_request(range(100, 106))
    assert bm.allocate_slots(other, 6) == []
    assert not set(other.block_table) & set(b.block_table)
    bm.free(b)
    bm.free(other)
    assert bm.num_free_blocks == 6


def test_eviction_order_is_lru_with_each_sequence_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_request(range(6))
    prefill(bm, a)
    assert a.block_table == [0, 1, 2]
    bm.free(a)  # queue: 3 4 5 | 2 1 0 (a's tail first)

    d = make_request(range(100, 108))
    bm.allocate_slots(d, 8)
    assert d.block_table == [3, 4, 5, 2]  # never-used blocks first, then a's last block
    # Block 2 was evicted, so its hash is gone; a's first two blocks are still found.
    computed, num_hit = bm.get_computed_blocks(make_request(range(7)))
    assert computed == [0, 1] and num_hit == 4
    bm.free(d)  # queue: 1 0 | 2 5 4 3

    e = make_request([0, 1, 77, 78])
    computed, num_hit = bm.get_computed_blocks(e)
    assert computed == [0] and num_hit == 2
    bm.allocate_slots(e, 2, computed)  # pulls 0 out of the middle of the queue, takes 1
    assert e.block_table == [0, 1]
    f = make_request(range(200, 208))
    bm.allocate_slots(f, 8)
    assert f.block_table == [2, 5, 4, 3]


def test_out_of_blocks_returns_none_and_changes_nothing():
    bm = BlockManager(num_blocks=5, block_size=4)
    a = make_request(range(8))
    prefill(bm, a)
    bm.free(a)  # two cached blocks at ref 0
    holder = make_request(range(50, 58))
    prefill(bm, holder)  # takes the two never-used blocks
    assert bm.num_free_blocks == 3

    def state():
        return bm.num_free_blocks, [bm.ref_count(i) for i in range(5)], list(bm._free_queue), dict(bm._hash_to_block)

    before = state()
    # Reviving the 2 cached blocks plus 2 fresh ones needs 4 free blocks; there are 3.
    b = make_request([*range(8), *range(60, 68)])
    computed, num_hit = bm.get_computed_blocks(b)
    assert len(computed) == 2
    assert bm.allocate_slots(b, b.num_tokens - num_hit, computed) is None
    assert b.block_table == [] and state() == before
    assert bm.get_computed_blocks(b) == (computed, num_hit)



def test_copy_on_write_without_a_free_block_returns_none_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    parent = make_request(range(6))
    prefill(bm, parent)
    child = fork_request(bm, parent)
    bm.allocate_slots(make_request(range(4)), 4)  # takes the last free block
    table, refs = list(child.block_table), [bm.ref_count(i) for i in range(3)]
    child.append_token(100)
    assert bm.allocate_slots(child, 1) is None
    assert child.block_table == table and [bm.ref_count(i) for i in range(3)] == refs


def test_copy_on_write_when_a_forked_child_appends_into_a_shared_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_request(range(6))  # [0..3] full, [4, 5] partial
    prefill(bm, parent)
    first, partial = parent.block_table
    child = fork_request(bm, parent)

    copies = decode(bm, child, 100)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == partial and dst not in (first, partial)
    assert child.block_table == [first, dst]
    assert parent.block_table == [first, partial]  # the parent keeps the original
    assert bm.ref_count(first) == 2 and bm.ref_count(partial) == 1 and bm.ref_count(dst) == 1

    # The parent is now the partial block's only holder and writes in place.
    assert decode(bm, parent, 200) == []
    assert parent.block_table == [first, partial]


def test_fork_of_full_blocks_then_both_append_copies_only_the_partial_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = make_request(range(8))  # two full blocks
    prefill(bm, parent)
    child = fork_request(bm, parent)
    assert decode(bm, child, 100) == [] and decode(bm, parent, 200) == []
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    assert [bm.ref_count(b) for b in child.block_table] == [2, 2, 1]

    parent = make_request(range(10))  # two full blocks and a partial one
    prefill(bm, parent)
    child = fork_request(bm, parent)
    copies = decode(bm, child, 100) + decode(bm, parent, 200)
    assert copies == [(parent.block_table[2], child.block_table[2])]
    assert child.block_table[:2] == parent.block_table[:2]


def test_shared_blocks_past_the_write_start_are_swapped_without_a_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_request(range(6))
    bm.allocate_slots(parent, 10)  # 6 tokens now, slots for 4 more: blocks [full, partial, empty]
    parent.num_computed_tokens = 6
    first, partial, empty = parent.block_table
    child = fork_request(bm, parent)
    child.token_ids += [1, 2, 3, 4]
    copies = bm.allocate_slots(child, 4)  # writes positions 6..9
    assert [src for src, _ in copies] == [partial]  # the empty block holds nothing to copy
    assert child.block_table[0] == first
    assert not {partial, empty} & set(child.block_table)
    assert [bm.ref_count(b) for b in parent.block_table] == [2, 1, 1]


def test_hashes_after_fork_and_copy_on_write_follow_each_sequence():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = make_request(range(6))
    prefill(bm, parent)
    child = fork_request(bm, parent)
    decode(bm, child, 100)
    decode(bm, child, 101)  # child's copied block is now full: [4, 5, 100, 101]
    decode(bm, parent, 200)
    decode(bm, parent, 201)  # parent's original block is full: [4, 5, 200, 201]

    hit_child = make_request([*range(6), 100, 101, 7])
    assert bm.get_computed_blocks(hit_child) == (child.block_table[:2], 8)
    hit_parent = make_request([*range(6), 200, 201, 7])
    assert bm.get_computed_blocks(hit_parent) == (parent.block_table[:2], 8)


def test_two_requests_computing_the_same_block_keep_the_first_entry():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_request(range(9)), make_request(range(9))
    # Both allocated before either is cached, as in one batch: no sharing, two copies.
    bm.allocate_slots(a, 9)
    bm.allocate_slots(b, 9)
    a.num_computed_tokens = b.num_computed_tokens = 9
    bm.cache_blocks(a, 9)
    bm.cache_blocks(b, 9)
    assert bm.get_computed_blocks(make_request(range(9)))[0] == a.block_table[:2]

    bm.free(b)  # b's duplicates go free without a hash ...
    bm.allocate_slots(make_request(range(100, 120)), 20)  # ... and get evicted
    assert bm.get_computed_blocks(make_request(range(9)))[0] == a.block_table[:2]


def test_cache_blocks_hashes_each_block_once(monkeypatch):
    calls = []
    real = bm_module.hash_block_tokens
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda p, t: calls.append(tuple(t)) or real(p, t))
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request(range(10))
    bm.allocate_slots(req, 10)
    for computed in range(11):  # chunked prefill, one token at a time
        bm.cache_blocks(req, computed)
    assert calls == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_misuse_raises():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request(range(9))
    prefill(bm, a)
    b = make_request(range(9))
    computed, _ = bm.get_computed_blocks(b)
    bm.allocate_slots(b, 1)
    with pytest.raises(ValueError):
        bm.allocate_slots(b, 1, computed)  # b already holds blocks
    with pytest.raises(ValueError):
        bm.fork(a, b)  # child already holds blocks
    with pytest.raises(ValueError):
        bm.cache_blocks(b, 9)  # more tokens than b's one block holds
    a.num_computed_tokens = 4
    with pytest.raises(ValueError):
        bm.allocate_slots(a, 5)  # would rewrite cached tokens
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)


def check_invariants(bm: BlockManager, live: list[Request], kv: list[list[int | None]]) -> None:
    refs = [bm.ref_count(i) for i in range(bm.num_blocks)]
    assert sum(refs) == sum(len(r.block_table) for r in live)
    assert bm.num_free_blocks + sum(1 for x in refs if x > 0) == bm.num_blocks
    assert all(x >= 0 for x in refs)
    for r in live:
        table_counts = {}
        for b in r.block_table:
            table_counts[b] = table_counts.get(b, 0) + 1
        assert max(table_counts.values(), default=1) == 1  # no block twice in one table
        # The fake KV cache holds exactly the request's tokens at every computed position.
        for pos in range(r.num_computed_tokens):
            assert kv[r.block_table[pos // bm.block_size]][pos % bm.block_size] == r.token_ids[pos]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_workload_keeps_kv_contents_right_and_leaks_nothing(seed, prefix_caching):
    rng = random.Random(seed)
    bs = 4
    bm = BlockManager(num_blocks=40, block_size=bs, enable_prefix_caching=prefix_caching)
    kv: list[list[int | None]] = [[None] * bs for _ in range(bm.num_blocks)]  # token id per slot
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: list[Request] = []
    num_hits = 0

    def step(req: Request) -> None:
        """Schedule a chunk of the request's uncomputed tokens and 'run the model' on it."""
        nonlocal num_hits
        computed, num_hit = ([], 0) if req.block_table else bm.get_computed_blocks(req)
        remaining = req.num_tokens - req.num_computed_tokens - num_hit
        chunk = rng.randint(1, remaining)
        snapshot = (list(req.block_table), [bm.ref_count(i) for i in range(bm.num_blocks)], bm.num_free_blocks)
        copies = bm.allocate_slots(req, chunk, computed)
        if copies is None:
            assert snapshot == (req.block_table, [bm.ref_count(i) for i in range(bm.num_blocks)], bm.num_free_blocks)
            bm.free(req)  # preempt: recompute from scratch later
            req.num_computed_tokens = 0
            return
        num_hits += num_hit
        req.num_computed_tokens += num_hit
        for src, dst in copies:
            kv[dst] = list(kv[src])
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + chunk):
            kv[req.block_table[pos // bs]][pos % bs] = req.token_ids[pos]
        req.num_computed_tokens += chunk
        bm.cache_blocks(req, req.num_computed_tokens)
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(rng.randrange(50))

    for _ in range(600):
        op = rng.random()
        if op < 0.2 or not live:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            if not prompt:
                continue
            live.append(make_request(prompt))
            if rng.random() < 0.1:  # aborted before it was ever scheduled
                bm.free(live.pop())
        elif op < 0.3:
            parent = rng.choice(live)
            child = fork_request(bm, parent)
            if child.num_tokens > child.num_computed_tokens:
                child.token_ids[-1] = rng.randrange(50)  # each sample picks its own token
            live.append(child)
        elif op < 0.42:
            bm.free(live.pop(rng.randrange(len(live))))  # finished or aborted
        else:
            step(rng.choice(live))
        check_invariants(bm, live, kv)

    if prefix_caching:
        assert num_hits > 0  # the workload did exercise the prefix cache
    for req in live:
        bm.free(req)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage() == 0.0
    assert all(bm.ref_count(i) == 0 for i in range(bm.num_blocks))
