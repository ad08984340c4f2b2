"""Automatic prefix caching: hits are counted, skip prompt compute, and never change outputs.

Every cached run is checked against the same prompts on an engine with caching off (greedy,
float32 on CPU, so outputs must be identical token for token).
"""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.kv_cache_manager import hash_block
from tests.engine.conftest import LONG_TEXT

BLOCK = 16
NUM_BLOCKS = 16
# SmolLM2-135M: 30 layers x (K, V) x 3 KV heads x 64 dims x float32, per token.
BLOCK_BYTES = 30 * 2 * 3 * 64 * 4 * BLOCK
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

PREFIX = LONG_TEXT[:300]  # ~52 tokens: 3 full blocks
QUESTIONS = ["\nQuestion: what replaced the wires?\nAnswer:",
             "\nQuestion: what did compilers replace?\nAnswer:",
             "\nSummarize in three words:"]


@pytest.fixture(scope="module")
def cached() -> LLM:
    """A small KV cache (16 blocks of 16 tokens), so that eviction happens."""
    llm = LLM(kv_cache_memory_bytes=NUM_BLOCKS * BLOCK_BYTES, max_model_len=256,
              enable_prefix_caching=True)
    assert llm.engine.core.kv_cache.pool.num_blocks == NUM_BLOCKS
    return llm


def _zero_kv_cache(llm: LLM) -> None:
    """Clears the NaNs a test planted, so later tests start from a clean cache."""
    for cache in llm.engine.core.runner.kv_caches:
        cache.zero_()


@pytest.fixture(scope="module")
def uncached() -> LLM:
    return LLM(kv_cache_memory_bytes=64 * 2**20, max_model_len=256, enable_prefix_caching=False)


@pytest.fixture(autouse=True)
def fresh_cache(cached):
    cached.engine.core.kv_cache.reset_prefix_cache()
    yield
    kv = cached.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"
    assert not cached.engine.has_unfinished_requests()


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _counters(llm: LLM) -> tuple[int, int, int]:
    stats = llm.engine.get_stats()
    return stats.prompt_tokens, stats.prefix_cache_queries, stats.prefix_cache_hits


def test_repeated_prefix_hits_the_cache_and_keeps_outputs(cached, uncached):
    tok = cached.get_tokenizer()
    prompts = [PREFIX + q for q in QUESTIONS]
    ids = [tok.encode(p) for p in prompts]
    want = _ids(uncached.generate(prompts, GREEDY, use_tqdm=False))

    before = _counters(cached)
    first = cached.generate(prompts[0], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    after_first = _counters(cached)
    assert after_first[2] == before[2]  # a fresh cache: no hits
    assert after_first[0] - before[0] == len(ids[0])

    rest = cached.generate(prompts[1:], GREEDY, use_tqdm=False)
    prompt_tokens, queries, hits = (a - b for a, b in zip(_counters(cached), after_first))
    assert _ids(first + rest) == want
    for out, prompt_ids in zip(rest, ids[1:]):
        shared = _common(prompt_ids, ids[0]) // BLOCK * BLOCK
        assert shared >= 2 * BLOCK and out.num_cached_tokens >= shared
    cached_tokens = sum(o.num_cached_tokens for o in rest)
    assert hits == cached_tokens
    assert queries == sum(len(i) for i in ids[1:])
    assert prompt_tokens == sum(len(i) for i in ids[1:]) - cached_tokens  # hits not computed

    # The very same prompt again: every full block but the one holding its last token.
    again = cached.generate(prompts[0], GREEDY, use_tqdm=False)
    assert again[0].num_cached_tokens == (len(ids[0]) - 1) // BLOCK * BLOCK
    assert _ids(again) == want[:1]


def test_prefix_shared_within_one_batch(cached, uncached):
    """Two new prompts with a common prefix in the same step: the second reuses blocks the
    first is computing in that very step."""
    prompts = [LONG_TEXT[600:900] + q for q in QUESTIONS[:2]]
    out = cached.generate(prompts, GREEDY, use_tqdm=False)
    assert out[0].num_cached_tokens == 0 and out[1].num_cached_tokens >= 2 * BLOCK
    assert _ids(out) == _ids(uncached.generate(prompts, GREEDY, use_tqdm=False))


def _cached_blocks(llm: LLM, token_ids: list[int]) -> int:
    """How many leading full blocks of a prompt the cache still holds (what a lookup finds)."""
    pool, parent, n = llm.engine.core.kv_cache.pool, None, 0
    for i in range((len(token_ids) - 1) // BLOCK):
        parent = hash_block(parent, token_ids[i * BLOCK:(i + 1) * BLOCK])
        if pool.lookup(parent) is None:
            break
        n += 1
    return n


def test_eviction_under_pressure_keeps_outputs(cached, uncached):
    # 6 prompts of ~55 tokens need 24 blocks of 16, 18 of them full prompt blocks: requests
    # wait, cached blocks of finished ones are evicted (LRU) to make room, and some prompts
    # lose their cached prefix.
    prompts = [f"Document {k}: " + LONG_TEXT[k * 41:k * 41 + 280] for k in range(6)]
    tok = cached.get_tokenizer()
    ids = [tok.encode(p) for p in prompts]
    assert all(3 * BLOCK < len(i) < 4 * BLOCK - 4 for i in ids)
    want = _ids(uncached.generate(prompts, GREEDY, use_tqdm=False))
    assert _ids(cached.generate(prompts, GREEDY, use_tqdm=False)) == want

    full = [(len(i) - 1) // BLOCK for i in ids]
    left = [_cached_blocks(cached, i) for i in ids]
    evicted = min(range(len(ids)), key=lambda k: left[k] - full[k])
    assert left[evicted] < full[evicted], "nothing was evicted; the test proves nothing"
    kept = max(range(len(ids)), key=lambda k: left[k])
    assert left[kept] > 0

    # An evicted (wholly or in part) prompt again: it hits what is left and recomputes the rest.
    out = cached.generate(prompts[evicted], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == left[evicted] * BLOCK
    assert out.outputs[0].token_ids == want[evicted]
    out = cached.generate(prompts[kept], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want[kept]


def test_parallel_samples_share_the_prompt_blocks(cached):
    """n = 4: the first sample computes the prompt; the other three, admitted once its last
    prompt chunk is scheduled (here in the same step: a block's K/V is written before any layer
    reads it), take its full blocks from the prefix cache (same block ids, ref count 4) and
    compute only the rest."""
    engine, kv = cached.engine, cached.engine.core.kv_cache
    prompt = "Write a short poem about the sea, the wind and the stars, in the style of a sailor."
    prompt_ids = cached.get_tokenizer().encode(prompt)
    assert len(prompt_ids) % BLOCK != 0
    shared = (len(prompt_ids) - 1) // BLOCK  # full blocks a sample can reuse
    assert shared >= 1
    params = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=4)
    before = _counters(cached)
    engine.add_request("par", prompt, params)
    children = [f"par-{i}" for i in range(4)]

    engine.step()  # sample 0 computes the prompt; samples 1-3 start from its blocks
    tables = [kv.block_ids(c) for c in children]
    for table in tables[1:]:
        assert table[:shared] == tables[0][:shared]
        assert table[shared:] and set(table[shared:]).isdisjoint(tables[0])
    assert len({t[-1] for t in tables}) == 4  # each sample writes its own last block
    for block_id in tables[0][:shared]:
        assert kv.pool.blocks[block_id].ref_cnt == 4
    prompt_tokens, _, hits = (a - b for a, b in zip(_counters(cached), before))
    assert hits == 3 * shared * BLOCK
    assert prompt_tokens == len(prompt_ids) + 3 * (len(prompt_ids) - shared * BLOCK)

    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert len(outputs) == 1 and len(outputs[0].outputs) == 4
    assert all(len(c.token_ids) == 4 for c in outputs[0].outputs)
    assert outputs[0].num_cached_tokens == 0  # the request's first sample found nothing


def test_unwritten_cache_slots_never_reach_outputs(cached, uncached):
    """Whatever an unwritten slot holds (here NaN, as uninitialized memory may), outputs are
    those of a clean cache: the runner's invariant is that a slot is written before it is read
    (block 0 aside, which must stay finite)."""
    # Several requests: block 0 (zeroed) is handed out too, but to one request at most.
    prompts = [PREFIX + q for q in QUESTIONS]
    want = _ids(uncached.generate(prompts, GREEDY, use_tqdm=False))
    try:
        for cache in cached.engine.core.runner.kv_caches:
            cache.fill_(float("nan"))
            cache[:, 0].zero_()
        got = _ids(cached.generate(prompts, GREEDY, use_tqdm=False))
    finally:
        _zero_kv_cache(cached)
    assert got == want
