"""BlockPool: allocation order, reference counts, the LRU free queue and the prefix-cache index."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedllm.core.block_pool import BlockPool, KVBlock


def ids(blocks: list[KVBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def drain(pool: BlockPool) -> list[int]:
    """Allocates every free block: the free queue's order, front (evicted first) to back."""
    return ids(pool.allocate(pool.num_free_blocks))


def test_core_imports_no_torch() -> None:
    code = ("import sys, pagedllm.config, pagedllm.core.block_pool, "
            "pagedllm.core.kv_cache_manager, pagedllm.core.request, pagedllm.core.scheduler; "
            "assert 'torch' not in sys.modules, 'the core imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0, enable_caching=True)


def test_fresh_pool_allocates_in_id_order_with_ref_count_one() -> None:
    pool = BlockPool(8, enable_caching=True)
    assert pool.num_free_blocks == 8
    first = pool.allocate(3)
    second = pool.allocate(2)
    assert ids(first) == [0, 1, 2]
    assert ids(second) == [3, 4]
    assert all(b.ref_cnt == 1 for b in first + second)
    assert pool.num_free_blocks == 3
    assert pool.allocate(0) == []


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4, enable_caching=True)
    pool.allocate(3)
    with pytest.raises(ValueError, match="cannot allocate 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert ids(pool.allocate(1)) == [3]


def test_ref_counts_shared_block_returns_on_last_free() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.touch([block])  # a second owner
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 3  # still held by the other owner
    pool.free([block])
    assert block.ref_cnt == 0
    assert pool.num_free_blocks == 4


def test_freed_blocks_join_the_back_of_the_queue_in_the_order_given() -> None:
    pool = BlockPool(6, enable_caching=True)
    a = pool.allocate(3)  # 0, 1, 2
    b = pool.allocate(2)  # 3, 4
    pool.free(reversed(a))  # tail first, as the KV cache manager frees a request
    pool.free(reversed(b))
    # Never-used block 5 is at the front; then a's tail..head, then b's tail..head.
    assert drain(pool) == [5, 2, 1, 0, 4, 3]


def test_double_free_asserts() -> None:
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="block 0 freed twice"):
        pool.free([block])


def test_cached_free_block_is_reclaimed_by_touch() -> None:
    pool = BlockPool(4, enable_caching=True)
    a = pool.allocate(2)
    pool.cache(a[0], 111)
    pool.cache(a[1], 222)
    pool.free(reversed(a))  # queue: 2, 3, 1, 0
    assert pool.num_free_blocks == 4
    hit = pool.lookup(111)
    assert hit is a[0] and hit.ref_cnt == 0
    pool.touch([hit])  # a prefix-cache hit takes it off the free queue
    assert hit.ref_cnt == 1
    assert pool.num_free_blocks == 3
    assert pool.lookup(111) is hit  # still indexed while in use
    assert drain(pool) == [2, 3, 1]  # block 0 is not handed out again


def test_allocate_evicts_cached_contents() -> None:
    pool = BlockPool(3, enable_caching=True)
    a = pool.allocate(2)  # 0, 1
    pool.cache(a[0], 111)
    pool.cache(a[1], 222)
    pool.free(reversed(a))  # queue: 2, 1, 0
    assert ids(pool.allocate(2)) == [2, 1]  # block 1 (the tail) is evicted first
    assert pool.lookup(222) is None
    assert a[1].block_hash is None
    assert pool.lookup(111) is a[0]  # block 0 survives
    assert a[0].block_hash == 111


def test_cache_first_block_with_a_hash_wins() -> None:
    pool = BlockPool(3, enable_caching=True)
    x, y = pool.allocate(2)
    pool.cache(x, 7)
    pool.cache(y, 7)  # same contents computed again elsewhere
    assert pool.lookup(7) is x
    assert y.block_hash is None
    pool.cache(x, 8)  # a block keeps its first hash
    assert x.block_hash == 7
    assert pool.lookup(8) is None


def test_caching_off_indexes_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.allocate(1)
    pool.cache(block, 5)
    assert pool.lookup(5) is None
    assert block.block_hash is None


def test_reset_prefix_cache_forgets_every_hash() -> None:
    pool = BlockPool(3, enable_caching=True)
    a = pool.allocate(2)
    pool.cache(a[0], 1)
    pool.cache(a[1], 2)
    pool.free([a[1]])  # one free, one in use: both are forgotten
    pool.reset_prefix_cache()
    assert pool.lookup(1) is None and pool.lookup(2) is None
    assert a[0].block_hash is None and a[1].block_hash is None


def test_usage_counts_held_blocks_only() -> None:
    pool = BlockPool(4, enable_caching=True)
    assert pool.usage == 0.0
    blocks = pool.allocate(3)
    assert pool.usage == pytest.approx(0.75)
    pool.cache(blocks[0], 1)
    pool.free(blocks)
    assert pool.usage == 0.0  # a cached but free block counts as free
    pool.touch([blocks[0]])
    assert pool.usage == pytest.approx(0.25)
