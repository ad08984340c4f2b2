"""KVCacheManager: each request's block table, and automatic prefix caching.

A request's blocks cover its ``num_computed_tokens``, which count every step scheduled (those
still in flight included). Every full
block is hashed, chained to the hash of the block before it, so one hash names a whole prefix;
a new request reuses the longest run of cached blocks of its prompt, except that at least its
last token is always computed (the logits for its first output come from it).
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.core.block_pool import BlockPool, KVBlock
from pagedllm.core.request import Request


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """The hash of a full block: its tokens, any extra keys (e.g. an image hash) and its parent."""
    return hash((parent_hash, tuple(token_ids), extra_keys))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
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
        starts after that. Read it; never change it."""
        return self._block_ids.get(request_id, [])

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
        short; then nothing changes."""
        request_id, bs = request.request_id, self.block_size
        blocks = self._blocks.get(request_id)
        if blocks is None:
            blocks = self._blocks[request_id] = []
            self._block_ids[request_id] = []
        num_computed = request.num_computed_tokens + len(cached) * bs
        total = num_computed + num_new_tokens
        if not cached and total <= len(blocks) * bs:  # a decode within its block
            if self.enable_caching and total // bs > self._num_registered.get(request_id, 0):
                self._register_full_blocks(request, blocks, min(total, request.num_tokens))
            return True
        needed = -(-total // bs) - len(blocks) - len(cached)
        # Touching a cached block that nobody references also takes it off the free queue.
        reclaimed = sum(1 for b in cached if b.ref_cnt == 0)
        if max(needed, 0) + reclaimed > self.pool.num_free_blocks:
            return False
        self.pool.touch(cached)
        start = len(blocks)
        blocks.extend(cached)
        if needed > 0:
            blocks.extend(self.pool.allocate(needed))
        self._block_ids[request_id].extend(b.block_id for b in blocks[start:])
        # A token still being sampled (async scheduling) is not hashed: its block waits.
        self._register_full_blocks(request, blocks, min(total, request.num_tokens))
        return True

    def free(self, request: Request) -> None:
        """Returns all of a request's blocks to the pool, tail first (evicted first)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def _register_full_blocks(self, request: Request, blocks: list[KVBlock],
                              num_tokens: int) -> None:
        # The K/V of these tokens is written this step, before any layer reads the cache, so a
        # block may be shared from the step that computes it.
        if not self.enable_caching:
            return
        start = self._num_registered.get(request.request_id, 0)
        end = num_tokens // self.block_size
        if end <= start:
            return
        self._extend_hashes(request, end)
        for i in range(start, end):
            self.pool.cache(blocks[i], request.block_hashes[i])
        self._num_registered[request.request_id] = end

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
