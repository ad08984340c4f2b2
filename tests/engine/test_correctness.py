"""Greedy output equals transformers' generate token for token, however the batch is cut."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, hf_greedy

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer) -> list[list[int]]:
    ids = [default_tokenizer.encode(p) for p in PROMPTS]
    assert max(len(i) for i in ids) > 300, "one prompt must be over 300 tokens"
    return ids


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids) -> list[list[int]]:
    # ignore_eos: transformers stops at EOS, so compare up to its length
    return [hf_greedy(hf_model, ids, MAX_TOKENS) for ids in prompt_ids]


def _check(llm: LLM, prompt_ids, expected) -> None:
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    for ids, want, out in zip(prompt_ids, expected, outputs):
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        assert got[:len(want)] == want, f"prompt of {len(ids)} tokens diverged"
        assert len(got) == MAX_TOKENS and out.outputs[0].finish_reason == "length"
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"


def test_defaults_match_transformers(prompt_ids, expected):
    llm = LLM(kv_cache_memory_bytes=512 * 2**20, max_model_len=1024)
    _check(llm, prompt_ids, expected)
    # A second pass hits the prefix cache for every full prompt block and stays exact.
    _check(llm, prompt_ids, expected)
    assert llm.engine.core.kv_cache.prefix_cache_hits > 0


def test_chunked_prefill_matches_transformers(prompt_ids, expected):
    llm = LLM(kv_cache_memory_bytes=512 * 2**20, max_model_len=1024, max_num_batched_tokens=32,
              max_num_seqs=8, enable_prefix_caching=False)
    _check(llm, prompt_ids, expected)


def test_preemption_matches_transformers(prompt_ids, expected):
    # 40 blocks of 16 tokens: the long prompt alone needs ~22, so requests must be preempted.
    block_bytes = 30 * 2 * 3 * 64 * 4 * 16
    llm = LLM(kv_cache_memory_bytes=40 * block_bytes, max_model_len=512,
              enable_prefix_caching=False)
    _check(llm, prompt_ids, expected)
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_async_scheduling_matches_transformers(prompt_ids, expected):
    # On the CPU async scheduling gains nothing, but its bookkeeping (tokens in flight, stops
    # seen a step late, preemption with a token pending) must stay exact: force it on, with
    # chunks and a cache small enough to preempt.
    block_bytes = 30 * 2 * 3 * 64 * 4 * 16
    llm = LLM(kv_cache_memory_bytes=40 * block_bytes, max_model_len=512,
              max_num_batched_tokens=64, max_num_seqs=8, async_scheduling=True)
    assert llm.engine.core.async_scheduling
    _check(llm, prompt_ids, expected)
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_async_scheduling_stops_at_the_same_text(default_tokenizer):
    prompts = ["1, 2, 3, 4, 5,", "The capital of France is", "def fibonacci(n):\n    "]
    params = [SamplingParams(temperature=0.0, max_tokens=40, stop=[" 9", "\n"]),
              SamplingParams(temperature=0.0, max_tokens=5),
              SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[198])]
    sync = LLM(kv_cache_memory_bytes=256 * 2**20, max_model_len=512)
    lagged = LLM(kv_cache_memory_bytes=256 * 2**20, max_model_len=512, async_scheduling=True)
    for a, b in zip(sync.generate(prompts, params, use_tqdm=False),
                    lagged.generate(prompts, params, use_tqdm=False)):
        assert (a.outputs[0].text, a.outputs[0].token_ids, a.outputs[0].finish_reason,
                a.outputs[0].stop_reason) == (b.outputs[0].text, b.outputs[0].token_ids,
                                              b.outputs[0].finish_reason, b.outputs[0].stop_reason)
    kv = lagged.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks
