"""KVCacheManager: block tables, chained prefix hashes, cache hits, eviction, no leaks."""

from __future__ import annotations

import pytest

from pagedllm.core.kv_cache_manager import PLACEHOLDER_BLOCK_ID, KVCacheManager, hash_block
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, req: Request) -> int:
    """Schedules a new request's whole prompt as the scheduler does (cache hit first); returns
    the hit in tokens and marks the prompt computed."""
    cached = kv.find_cached_prefix(req)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate(req, req.num_tokens - num_cached, cached)
    req.num_computed_tokens = req.num_tokens
    return num_cached


@pytest.mark.parametrize(("num_tokens", "num_blocks"),
                         [(1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_blocks_for_n_tokens(num_tokens: int, num_blocks: int) -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=False)
    req = make_request("r", range(num_tokens))
    assert kv.allocate(req, num_tokens)
    assert kv.block_ids("r") == list(range(num_blocks))
    assert kv.num_free_blocks == 10 - num_blocks


def test_growing_across_a_block_boundary() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=False)
    req = make_request("r", range(15))
    assert kv.allocate(req, 15)
    req.num_computed_tokens = 15
    req.output_token_ids.append(100)  # 16 tokens: still one block
    assert kv.allocate(req, 1)
    assert kv.block_ids("r") == [0]
    req.num_computed_tokens = 16
    req.output_token_ids.append(101)  # the 17th token needs a second block
    assert kv.allocate(req, 1)
    assert kv.block_ids("r") == [0, 1]
    assert kv.num_free_blocks == 8


def test_live_block_ids_grow_in_place_until_freed() -> None:
    """The list the scheduler hands to the runner: the same object while the request holds its
    blocks (so the runner copies only new ids), a new one after its blocks were freed."""
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=False)
    req = make_request("r", range(16))
    assert kv.allocate(req, 16)
    live = kv.live_block_ids("r")
    req.num_computed_tokens = 16
    req.output_token_ids.append(100)
    assert kv.allocate(req, 1)
    assert kv.live_block_ids("r") is live and live == kv.block_ids("r") == [0, 1]
    kv.free(req)
    req.num_computed_tokens = 0
    assert kv.allocate(req, 17)
    assert kv.live_block_ids("r") is not live and live == [0, 1]
    assert kv.live_block_ids("r") == kv.block_ids("r")


def test_allocate_false_when_short_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=16, enable_caching=True)
    req = make_request("r", range(33))  # needs 3 blocks
    assert not kv.allocate(req, 33)
    assert kv.num_free_blocks == 2
    assert kv.block_ids("r") == []
    assert kv.usage == 0.0


def test_allocate_false_with_cached_prefix_leaves_the_cache_alone() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=16, enable_caching=True)
    a = make_request("a", range(20))
    admit(kv, a)  # blocks 0, 1; block 0 full and cached
    kv.free(a)
    b = make_request("b", list(range(16)) + list(range(500, 540)))  # 56 tokens: 4 blocks
    cached = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in cached] == [0]
    # 1 reclaimed + 3 new > 3 free.
    assert not kv.allocate(b, 40, cached)
    assert cached[0].ref_cnt == 0
    assert kv.num_free_blocks == 3
    assert kv.block_ids("b") == []
    assert kv.find_cached_prefix(make_request("c", list(range(16)) + [9]))[0] is cached[0]


def test_prefix_hit_on_a_repeated_prefix_full_blocks_only() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=True)
    a = make_request("a", range(40))  # 2 full blocks + 8 tokens
    assert admit(kv, a) == 0
    assert kv.block_ids("a") == [0, 1, 2]
    b = make_request("b", list(range(40)) + [999] * 5)
    cached = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in cached] == [0, 1]  # block 2 is partial: never cached
    assert kv.allocate(b, 45 - 32, cached)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.num_free_blocks == 6  # 4 distinct blocks in use
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_hits_while_the_owner_is_freed_still_count() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=True)
    a = make_request("a", range(40))
    admit(kv, a)
    kv.free(a)  # blocks stay cached in the free queue
    b = make_request("b", list(range(40)) + [7])
    assert admit(kv, b) == 32
    assert kv.block_ids("b")[:2] == [0, 1]


def test_same_block_after_a_different_prefix_does_not_hit() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=True)
    shared = list(range(100, 116))
    a = make_request("a", list(range(16)) + shared + [1])
    admit(kv, a)
    b = make_request("b", list(range(50, 66)) + shared + [1])  # block 1 equal, block 0 not
    assert kv.find_cached_prefix(b) == []
    assert a.block_hashes[1] != b.block_hashes[1]
    assert hash_block(None, range(16)) == a.block_hashes[0]
    assert hash_block(a.block_hashes[0], shared) == a.block_hashes[1]


def test_never_the_whole_prompt() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=True)
    a = make_request("a", range(32))
    admit(kv, a)  # both blocks full and cached
    b = make_request("b", range(32))
    cached = kv.find_cached_prefix(b)
    # The last token must be computed for its logits, so block 1 is computed again.
    assert [blk.block_id for blk in cached] == [0]
    assert kv.allocate(b, 16, cached)
    assert kv.block_ids("b") == [0, 2]


def test_hit_and_query_counters_are_in_tokens() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=True)
    admit(kv, make_request("a", range(32)))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (32, 0)
    admit(kv, make_request("b", range(32)))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (64, 16)
    admit(kv, make_request("c", list(range(32)) + [5, 6]))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (98, 48)


def test_eviction_under_pressure_is_lru() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_request("a", range(8))  # blocks 0, 1
    b = make_request("b", range(100, 108))  # blocks 2, 3
    admit(kv, a)
    admit(kv, b)
    kv.free(a)  # a freed first: least recently used
    kv.free(b)
    # Free queue: 4 5 6 7 (never used), 1 0 (a, tail first), 3 2 (b, tail first).
    c = make_request("c", range(200, 220))  # 5 blocks: the 4 unused, then a's tail
    admit(kv, c)
    assert kv.block_ids("c") == [4, 5, 6, 7, 1]
    a2 = make_request("a2", list(range(8)) + [9])  # could hit 2 blocks; block 1 was evicted
    assert [blk.block_id for blk in kv.find_cached_prefix(a2)] == [0]
    b2 = make_request("b2", list(range(100, 108)) + [9])
    assert [blk.block_id for blk in kv.find_cached_prefix(b2)] == [2, 3]
    d = make_request("d", range(300, 304))  # next to go: a's head, then b's
    admit(kv, d)
    assert kv.block_ids("d") == [0]
    assert kv.find_cached_prefix(a2) == []


def test_caching_off_never_hits_or_counts() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=False)
    a = make_request("a", range(40))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", range(40))
    assert kv.find_cached_prefix(b) == []
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)
    assert all(blk.block_hash is None for blk in kv.pool.blocks)


def test_reset_prefix_cache_drops_hits() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, enable_caching=True)
    a = make_request("a", range(40))
    admit(kv, a)
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.find_cached_prefix(make_request("b", range(40))) == []


def test_free_returns_tail_first_and_leaks_nothing() -> None:
    kv = KVCacheManager(num_blocks=12, block_size=4, enable_caching=True)
    reqs = [make_request(f"r{i}", [i] * 4 + list(range(i * 10, i * 10 + 6))) for i in range(3)]
    for req in reqs:
        admit(kv, req)
    assert kv.num_free_blocks == 12 - 9
    for req in reqs:
        kv.free(req)
        assert kv.block_ids(req.request_id) == []
    assert kv.num_free_blocks == 12
    assert kv.usage == 0.0
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    kv.free(reqs[0])  # freeing a request that holds nothing is harmless
    assert kv.num_free_blocks == 12


# -- sliding window on every layer: blocks out of the window go back to the pool -------------
# A query at p sees keys in (p - window, p]; the next query is at num_computed_tokens, so the
# blocks ending at or before num_computed_tokens - window are read by no future query.

P = PLACEHOLDER_BLOCK_ID


def decode(kv: KVCacheManager, req: Request, n: int = 1) -> None:
    """n decode steps: a sampled token, then its KV computed."""
    for _ in range(n):
        req.output_token_ids.append(7)
        assert kv.allocate(req, 1)
        req.num_computed_tokens += 1


def test_blocks_out_of_the_window_are_freed_as_computation_advances() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False, sliding_window=6)
    req = make_request("r", range(8))
    admit(kv, req)  # the prompt's queries at 0..7 reach back to position 0: both blocks kept
    assert kv.block_ids("r") == [0, 1] and kv.num_free_blocks == 8
    decode(kv, req)  # the query at 8 sees 3..8: block 0 (0..3) still read
    assert kv.block_ids("r") == [0, 1, 2] and kv.num_free_blocks == 7
    decode(kv, req)  # the query at 9 sees 4..9: block 0 ends at 3 = 9 - 6
    assert kv.block_ids("r") == [P, 1, 2] and kv.held_block_ids("r") == [1, 2]
    assert kv.num_free_blocks == 8
    decode(kv, req, 4)  # the query at 13 sees 8..13: blocks 0 and 1 are out
    assert kv.block_ids("r") == [P, P, 2, 3] and kv.num_free_blocks == 8
    decode(kv, req, 8)  # the table keeps its length; at most ceil(6 / 4) + 1 blocks held
    assert len(kv.block_ids("r")) == 6 and len(kv.held_block_ids("r")) <= 3
    kv.free(req)
    assert kv.num_free_blocks == 10 and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_a_chunk_frees_the_blocks_left_of_its_first_query_window() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False, sliding_window=4)
    req = make_request("r", range(40))
    assert kv.allocate(req, 16)
    req.num_computed_tokens = 16
    assert kv.allocate(req, 16)  # queries 16..31 see from 13 on: blocks 0..2 (0..11) are out
    assert kv.block_ids("r")[:4] == [P, P, P, 3] and kv.num_free_blocks == 10 - 5


def test_a_shared_block_is_only_dereferenced() -> None:
    """A prefix hit out of the window is never taken, and a block another request still holds
    stays out of the free queue when one of its holders drops it."""
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True, sliding_window=4)
    a = make_request("a", range(13))
    admit(kv, a)  # blocks 0..3, three of them full and cached
    b = make_request("b", [*range(12), 99, 98])
    assert admit(kv, b) == 12  # queries at 12, 13 see from 9 on: hits 0 and 1 are not taken
    assert kv.block_ids("b") == [P, P, 2, 4]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 2, 1]
    decode(kv, a, 3)  # a's query at 15 sees 12..15: a drops blocks 0..2, b keeps block 2
    assert kv.block_ids("a")[:3] == [P, P, P]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [0, 0, 1, 1]
    assert kv.num_free_blocks == 10 - 3  # blocks 2 (b), 3 (a) and 4 (b)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10 and all(b.ref_cnt == 0 for b in kv.pool.blocks)
    # Dropped blocks keep their hashes in the free queue: the whole prompt hits again.
    c = make_request("c", [*range(12), 5])
    assert admit(kv, c) == 12


def test_every_held_block_is_returned_once_after_drops() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True, sliding_window=5)
    req = make_request("r", range(6))
    admit(kv, req)
    decode(kv, req, 10)
    assert kv.num_free_blocks == 6 - len(kv.held_block_ids("r"))
    kv.free(req)  # preemption, abort and finish all free this way
    assert kv.block_ids("r") == [] and kv.held_block_ids("r") == []
    assert kv.num_free_blocks == 6 and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_without_a_window_every_block_is_kept() -> None:
    """Full attention on any layer (window 0, Gemma 2/3's mix too) reads the whole context."""
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    req = make_request("r", range(8))
    admit(kv, req)
    decode(kv, req, 12)
    assert kv.block_ids("r") == list(range(5)) and kv.num_free_blocks == 5
