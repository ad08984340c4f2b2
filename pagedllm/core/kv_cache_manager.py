"""KVCacheManager: each request's block table, and automatic prefix caching.

A request's blocks cover its ``num_computed_tokens``, which count every step scheduled (those
still in flight included). Every full
block is hashed, chained to the hash of the block before it, so one hash names a whole prefix;
a new request reuses the longest run of cached blocks of its prompt, except that at least its
last token is always computed (the logits for its first output come from it).

Sliding windows: when every attention layer of the model slides (``window``: the largest of
their windows, so that a block out of it is out of each), a query at position p sees keys in
(p - window, p] only, and the next query of a request is at its
``num_computed_tokens`` (queries only move right). So a block whose last position is
``<= num_computed_tokens - window`` is read by no future query: it goes back to the pool (with
its prefix-cache hash, like any freed block), and its slot in the block table becomes
``PLACEHOLDER_BLOCK_ID`` so that the table keeps its length (positions stay block indices).
A model with both sliding and full layers (Gemma 2/3) keeps every block: its full layers read
the whole context, and giving the sliding layers their own blocks needs separate KV cache
groups (vLLM's hybrid allocator), which this manager does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.core.block_pool import BlockPool, KVBlock
from pagedllm.core.request import Request


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """The hash of a full block: its tokens, any extra keys (e.g. an image hash) and its parent."""
    return hash((parent_hash, tuple(token_ids), extra_keys))


# The id in a block table's slots out of the window. Attention reads no position left of a
# query's window: the Triton kernel starts its loop at the window, the torch backend's chunks
# gather from the window's first block on, and its decodes mask those positions (as they mask
# their padding, which is block 0 too). An id of a real block keeps every gather in bounds.
PLACEHOLDER_BLOCK_ID = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 sliding_window: int = 0) -> None:
        """``sliding_window``: the window of every attention layer; 0 when any layer attends
        to the whole context (then no block is freed before its request ends)."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching)
        # The blocks a request holds: its table's slots from _num_dropped on.
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_dropped: dict[str, int] = {}  # leading slots out of the window (placeholders)
        # The same tables as lists of block ids, kept in step with _blocks, so that a step
        # does not read block_id off every block of every request.
        self._block_ids: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks already in the cache index
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a fresh list)."""
        return list(self._block_ids.get(request_id, ()))

    def live_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as the manager's own list, for readers that follow it
        from step to step: it only grows until the request's blocks are freed, and a new list
        starts after that; the one change in place is a slot out of the sliding window turning
        into ``PLACEHOLDER_BLOCK_ID``, which a reader may miss (it keeps the old id, which
        attention never reads either). Read it; never change it."""
        return self._block_ids.get(request_id, [])

    def held_block_ids(self, request_id: str) -> list[int]:
        """The blocks the request references: its table less the leading slots out of the
        window (placeholders)."""
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The cached blocks a newly scheduled request can reuse (not yet referenced).

        A request asking for prompt logprobs reuses nothing: every prompt position's logits
        must be computed."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        self._extend_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        return hits

    def allocate(self, request: Request, num_new_tokens: int,
                 cached: Sequence[KVBlock] = ()) -> bool:
        """Gives the request blocks for ``num_new_tokens`` more tokens (after its computed ones
        and the ``cached`` prefix blocks, which it starts to reference). False if the pool is
        short; then nothing changes, except that blocks out of the sliding window may have
        gone back to the pool (no future query reads them)."""
        request_id, bs = request.request_id, self.block_size
        blocks = self._blocks.get(request_id)
        if blocks is None:
            blocks = self._blocks[request_id] = []
            self._block_ids[request_id] = []
            self._num_dropped[request_id] = 0
        table = self._block_ids[request_id]
        num_computed = request.num_computed_tokens + len(cached) * bs
        total = num_computed + num_new_tokens
        out_of_window = self._num_out_of_window(num_computed)
        # Only a request without blocks gets cached ones; one with blocks drops its old ones.
        skip = min(out_of_window, len(cached))  # hits out of the window are not even taken
        if not cached:
            self._drop(request_id, out_of_window)
        if not cached and total <= len(table) * bs:  # a decode within its block
            if self.enable_caching and total // bs > self._num_registered.get(request_id, 0):
                self._register_full_blocks(request, min(total, request.num_tokens))
            return True
        needed = -(-total // bs) - len(table) - len(cached)
        taken = cached[skip:]
        # Touching a cached block that nobody references also takes it off the free queue.
        reclaimed = sum(1 for b in taken if b.ref_cnt == 0)
        if max(needed, 0) + reclaimed > self.pool.num_free_blocks:
            return False
        self.pool.touch(taken)
        table.extend([PLACEHOLDER_BLOCK_ID] * skip)
        self._num_dropped[request_id] += skip
        start = len(blocks)
        blocks.extend(taken)
        if needed > 0:
            blocks.extend(self.pool.allocate(needed))
        table.extend(b.block_id for b in blocks[start:])
        # A token still being sampled (async scheduling) is not hashed: its block waits.
        self._register_full_blocks(request, min(total, request.num_tokens))
        return True

    def free(self, request: Request) -> None:
        """Returns all of a request's blocks to the pool, tail first (evicted first)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._num_dropped.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def _num_out_of_window(self, num_computed: int) -> int:
        """Leading blocks no query at a position >= ``num_computed`` reads: those whose last
        position, (i + 1) * block_size - 1, is <= num_computed - window, the last key left of
        the first such query's window (num_computed - window, num_computed]."""
        if not self.sliding_window:
            return 0
        return max(num_computed - self.sliding_window + 1, 0) // self.block_size

    def _drop(self, request_id: str, num_out_of_window: int) -> None:
        """Returns the request's blocks out of the window to the pool; a block shared with
        another request (a prefix hit) only loses this request's reference."""
        n = num_out_of_window - self._num_dropped[request_id]
        if n <= 0:
            return
        blocks, table = self._blocks[request_id], self._block_ids[request_id]
        dropped, first = blocks[:n], self._num_dropped[request_id]
        del blocks[:n]
        table[first:num_out_of_window] = [PLACEHOLDER_BLOCK_ID] * n
        self._num_dropped[request_id] = num_out_of_window
        # Freed while a step in flight may still read them: a step that reuses them for other
        # tokens runs after it (as for blocks of preempted or finished requests).
        self.pool.free(reversed(dropped))

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        # The K/V of these tokens is written this step, before any layer reads the cache, so a
        # block may be shared from the step that computes it.
        if not self.enable_caching:
            return
        request_id = request.request_id
        start = self._num_registered.get(request_id, 0)
        end = num_tokens // self.block_size
        if end <= start:
            return
        self._extend_hashes(request, end)
        # Slots before the held blocks are out of the window: prefix hits, already in the
        # index, or blocks registered before they were dropped (a block is full, hence
        # registered, before the window leaves it, for any window of 2 or more).
        dropped, blocks = self._num_dropped[request_id], self._blocks[request_id]
        for i in range(max(start, dropped), end):
            self.pool.cache(blocks[i - dropped], request.block_hashes[i])
        self._num_registered[request_id] = end

    def _extend_hashes(self, request: Request, num_blocks: int | None = None) -> None:
        hashes = request.block_hashes
        bs = self.block_size
        target = request.num_tokens // bs if num_blocks is None else num_blocks
        while len(hashes) < target:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            start, end = i * bs, (i + 1) * bs
            # Image tokens are all the same placeholder id: the image's content tells them apart.
            images = tuple(f.image.content_hash for f in request.images
                           if f.offset < end and f.end > start)
            hashes.append(hash_block(parent, request.token_ids(start, end), images))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
