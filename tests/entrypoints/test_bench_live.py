"""`pagedllm bench serve`'s client against a live pagedllm server (the session's test server)."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.benchmarks.datasets import sample_random_requests
from pagedllm.benchmarks.serve import ServeConfig, run_benchmark

pytestmark = pytest.mark.slow


def test_bench_client_against_live_server(server, default_tokenizer, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    requests = sample_random_requests(default_tokenizer, 4, input_len=24, output_len=6, seed=3)
    config = ServeConfig(base_url=server.url, max_concurrency=2, ignore_eos=True,
                         disable_tqdm=True)
    metrics = asyncio.run(run_benchmark(requests, config))
    assert metrics.completed == 4 and metrics.failed == 0 and metrics.usage_missing == 0
    assert metrics.total_output == sum(r.expected_output_len for r in requests)
    expected_input = sum(len(default_tokenizer.encode(r.prompt)) for r in requests)
    assert metrics.total_input == expected_input
    assert metrics.ttft.median > 0 and metrics.max_concurrent_requests <= 2
