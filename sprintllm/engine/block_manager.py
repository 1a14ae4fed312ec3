"""Block ids of the paged KV cache: reference counts, a prefix cache and copy-on-write.

The KV cache is one preallocated tensor per layer cut into `num_blocks` blocks of
`block_size` token slots. This class hands out block ids; it never touches tensors. A request
holds its blocks in `request.block_table`, in token order: token `i` lives in slot
`i % block_size` of block `block_table[i // block_size]`.

Sharing. A block may sit in several tables at once (prefix-cache hits, parallel sampling,
beam search); its reference count is the number of tables holding it. A block at ref 0 is
free, but if it is full of computed tokens it keeps its hash and stays findable by later
requests until it is handed out again (evicted).

Prefix cache. A full block is identified by a chained hash: hash(parent block's hash, the
block's token ids). Chaining makes the hash depend on the whole prefix, so the same block
content after a different prefix never matches. The hash is Python's built-in `hash` on a
tuple of ints: 64 bits, deterministic across processes (only str/bytes hashing is salted),
so an accidental collision among N cached blocks has odds of about N^2 / 2^65 — about 3e-8
for a million blocks. It is not collision resistant against a crafted prompt, though: where
tenants that must not see each other's data share one engine, switch to a cryptographic
hash (vLLM offers sha256 for this reason).

Eviction order. Free blocks wait in one queue, and allocation takes the least recently freed
block first (LRU). A finished request puts its blocks in tail first: the last blocks of a
sequence are the least likely to be shared by a future prompt, so they are evicted before
its leading blocks (the reasoning of vLLM v1's block pool).

Misuse. `free` is idempotent: it empties the table, so freeing again (or freeing a request
aborted before it got blocks) does nothing. Calls that would corrupt the cache raise
ValueError: attaching prefix hits to a request that already holds blocks, attaching a block
that was evicted in the meantime, rewriting tokens already registered in the prefix cache,
caching more tokens than the table holds, and forking into a child that holds blocks.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from sprintllm.engine.request import Request

# Parent hash of a sequence's first block. An int (not None): hash(None) is salted per
# process before Python 3.12, and equal inputs should hash equally in every process.
_ROOT_HASH = 0


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block (see the module docstring for collision odds)."""
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # Blocks at ref 0, least recently freed first. An ordered dict, not a list, because a
        # prefix hit pulls a cached block out of the middle of the queue and that must be O(1).
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # The prefix cache: hash -> block, and back. A block holds a hash exactly when it is
        # that hash's entry in the map.
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: list[int | None] = [None] * num_blocks
        # Chained hashes of each request's leading full computed blocks already registered, so
        # that cache_blocks does no work on steps that fill no new block.
        self._request_hashes: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks at ref 0, including cached blocks that are still findable."""
        return len(self._free_queue)

    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Prefix-cache lookup, no side effects: the longest run of the request's leading full
        blocks found in the cache, as (block_ids, num_tokens).

        Stops one token short of the whole sequence: the last token must be computed to get
        logits. Pass the result straight to allocate_slots; an allocation in between may evict
        the blocks found here.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        blocks: list[int] = []
        parent = _ROOT_HASH
        for start in range(0, (request.num_tokens - 1) // bs * bs, bs):
            parent = hash_block_tokens(parent, request.token_ids[start:start + bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * bs

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[tuple[int, int]] | None:
        """Grow request.block_table to cover `num_new_tokens` more tokens after the computed ones.

        `computed_blocks` (prefix hits from get_computed_blocks) are attached first; the caller
        then advances request.num_computed_tokens by their tokens. A shared block in the range
        the new tokens write to is replaced by a private one (copy-on-write). Returns the
        (src, dst) block copies the model runner must do before the forward, or None when
        there are not enough free blocks, in which case nothing changed.
        """
        bs = self.block_size
        table = request.block_table
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if computed_blocks and (table or request.num_computed_tokens):
            raise ValueError(f"request {request.request_id}: prefix hits attach only to a request holding no blocks")
        if any(self._block_hash[b] is None for b in computed_blocks):
            raise ValueError(f"request {request.request_id}: a prefix-hit block was evicted since the lookup")
        start = request.num_computed_tokens + len(computed_blocks) * bs
        if start < len(self._request_hashes.get(request.request_id, ())) * bs:
            raise ValueError(f"request {request.request_id}: would overwrite tokens registered in the prefix cache")

        to_copy = self._shared_blocks_written(table, start, num_new_tokens)
        num_fresh = max(0, self.num_blocks_needed(start + num_new_tokens) - len(table) - len(computed_blocks))
        # Cached blocks at ref 0 sit in the free queue, so attaching them uses up free blocks too.
        num_revived = sum(1 for b in computed_blocks if self._ref_counts[b] == 0)
        if len(to_copy) + num_fresh + num_revived > self.num_free_blocks:
            return None

        for block in computed_blocks:
            self._take_ref(block)
        if computed_blocks:
            self._request_hashes[request.request_id] = [self._block_hash[b] for b in computed_blocks]
        table.extend(computed_blocks)

        copies = []
        for i in to_copy:
            src, dst = table[i], self._pop_free_block()
            self._ref_counts[src] -= 1  # stays >= 1: another table still holds it
            table[i] = dst
            # Only the block the write starts in can hold this request's earlier tokens; a
            # shared block further on holds none of them, so swapping it needs no copy.
            if i * bs < start:
                copies.append((src, dst))
        table.extend(self._pop_free_block() for _ in range(num_fresh))
        return copies

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed tokens, up to
        `num_computed_tokens`, so that later requests can reuse them.

        Pass only tokens whose K/V are final (not speculative tokens still to be verified):
        registered blocks are never written again. O(1) when no new block is full.
        """
        if not self.enable_prefix_caching:
            return
        hashes = self._request_hashes.setdefault(request.request_id, [])
        num_full = num_computed_tokens // self.block_size
        if num_full <= len(hashes):
            return
        if num_computed_tokens > min(request.num_tokens, len(request.block_table) * self.block_size):
            raise ValueError(
                f"request {request.request_id}: cannot cache {num_computed_tokens} tokens, it has "
                f"{request.num_tokens} tokens and {len(request.block_table)} blocks"
            )
        bs = self.block_size
        parent = hashes[-1] if hashes else _ROOT_HASH
        for i in range(len(hashes), num_full):
            parent = hash_block_tokens(parent, request.token_ids[i * bs:(i + 1) * bs])
            hashes.append(parent)
            # When another request already registered the same content, keep that entry: it
            # may be in other tables, and this block is then simply an uncached duplicate.
            if parent not in self._hash_to_block:
                block = request.block_table[i]
                self._hash_to_block[parent] = block
                self._block_hash[block] = parent

    def free(self, request: Request) -> None:
        """Drop the request's references and empty its table (a no-op on an empty table)."""
        self._request_hashes.pop(request.request_id, None)
        # Tail first, so that the sequence's last blocks are the first to be evicted.
        for block in reversed(request.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free_queue[block] = None
        request.block_table = []

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's blocks, shared (parallel sampling, beam search)."""
        if child.block_table or child.request_id == parent.request_id:
            raise ValueError(f"cannot fork {parent.request_id} into {child.request_id}: need a distinct, empty child")
        for block in parent.block_table:
            self._ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        if parent.request_id in self._request_hashes:
            self._request_hashes[child.request_id] = list(self._request_hashes[parent.request_id])

    def _shared_blocks_written(self, table: list[int], start: int, num_new_tokens: int) -> list[int]:
        """Indices in `table` of shared blocks that tokens [start, start + num_new_tokens) write to."""
        if num_new_tokens == 0:
            return []
        end_block = min(len(table), self.num_blocks_needed(start + num_new_tokens))
        return [i for i in range(start // self.block_size, end_block) if self._ref_counts[table[i]] > 1]

    def _take_ref(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._free_queue[block]
        self._ref_counts[block] += 1

    def _pop_free_block(self) -> int:
        """Hand out the least recently freed block, evicting its cache entry if it has one."""
        block, _ = self._free_queue.popitem(last=False)
        block_hash = self._block_hash[block]
        if block_hash is not None:
            del self._hash_to_block[block_hash]
            self._block_hash[block] = None
        self._ref_counts[block] = 1
        return block
