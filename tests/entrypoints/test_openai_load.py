"""Many requests at once: batching, cancellation that frees KV blocks, and metrics that count.

Runs against the session's server; each test waits until its own requests are gone, so the
metric deltas it reads are its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.entrypoints.conftest import Server

pytestmark = pytest.mark.slow

NUM_CONCURRENT = 32


def _bucket(server_metrics: dict, name: str, le: float) -> float:
    for (sample, labels), value in server_metrics.items():
        if sample == name + "_bucket" and ("le", str(float(le))) in labels:
            return value
    raise KeyError((name, le))


def _wait_idle(server: Server, timeout: float = 30.0) -> dict:
    """Waits until no request runs or waits and every KV block is back in the pool."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        v = {name.split(":")[1]: m[(name, frozenset())] for name in (
            "pagedllm:num_requests_running", "pagedllm:num_requests_waiting",
            "pagedllm:kv_cache_usage_perc", "pagedllm:kv_cache_free_blocks",
            "pagedllm:kv_cache_total_blocks")}
        if (v["num_requests_running"] == v["num_requests_waiting"] == v["kv_cache_usage_perc"] == 0
                and v["kv_cache_free_blocks"] == v["kv_cache_total_blocks"] > 0):
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


async def _stream_one(client, model: str, i: int, max_tokens: int) -> tuple[str, int]:
    stream = await client.completions.create(
        model=model, prompt=f"Request {i}: count to ten.", max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    text, tokens = "", 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return text, tokens


def test_concurrent_streams_are_batched(server: Server) -> None:
    model = server.client().models.list().data[0].id
    before = _wait_idle(server)
    steps = "pagedllm:iteration_num_requests"

    async def run() -> list[tuple[str, int]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(_stream_one(client, model, i, 8)
                                          for i in range(NUM_CONCURRENT)))

    results = asyncio.run(run())
    assert all(tokens == 8 and text for text, tokens in results)
    after = _wait_idle(server)
    # Some step ran more than 16 requests together: the >16 buckets gained observations.
    big = (after[(steps + "_count", frozenset())] - _bucket(after, steps, 16)) \
        - (before[(steps + "_count", frozenset())] - _bucket(before, steps, 16))
    assert big > 0
    generated = after[("pagedllm:generation_tokens_total", frozenset())] \
        - before[("pagedllm:generation_tokens_total", frozenset())]
    assert generated == 8 * NUM_CONCURRENT


def test_cancelled_requests_free_their_blocks(server: Server) -> None:
    model = server.client().models.list().data[0].id
    _wait_idle(server)
    aborts_before = server.metric("pagedllm:request_success_total", finished_reason="abort")
    n_streams = 32

    async def start_and_cancel() -> None:
        async with server.async_client() as client:
            streams = await asyncio.gather(*(client.completions.create(
                model=model, prompt=f"Story {i}:", max_tokens=800, stream=True,
                extra_body={"ignore_eos": True}) for i in range(n_streams)))
            await asyncio.gather(*(s.__anext__() for s in streams))  # every one is running
            assert server.metric("pagedllm:kv_cache_usage_perc") > 0
            for stream in streams:
                await stream.close()

    asyncio.run(start_and_cancel())
    # A request that was never streamed: the client gives up, the server must notice.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=server.auth, timeout=2.0,
                   json={"prompt": "Long story:", "max_tokens": 800, "ignore_eos": True})
    start = time.monotonic()
    while server.metric("pagedllm:request_success_total", finished_reason="abort") \
            < aborts_before + n_streams + 1:
        assert time.monotonic() - start < 30, "the abandoned requests were not aborted"
        time.sleep(0.05)
    _wait_idle(server, timeout=10)
    r = server.client().completions.create(model=model, prompt="Hi", max_tokens=4)
    assert r.usage.completion_tokens == 4
    assert time.monotonic() - start < 30
    _wait_idle(server)


def test_metrics_count_known_requests(server: Server) -> None:
    client = server.client()
    model = client.models.list().data[0].id
    before = _wait_idle(server)
    prompts = [f"Metrics probe number {i} says" for i in range(3)]
    prompt_tokens = 0
    for i, prompt in enumerate(prompts):  # unique short prompts: no prefix-cache hits
        r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                      stream=i == 2, extra_body={"ignore_eos": True},
                                      **({"stream_options": {"include_usage": True}}
                                         if i == 2 else {}))
        usage = list(r)[-1].usage if i == 2 else r.usage
        assert usage.completion_tokens == 5
        prompt_tokens += usage.prompt_tokens
    after = _wait_idle(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("pagedllm:request_success_total", finished_reason="length") == 3
    assert delta("pagedllm:generation_tokens_total") == 15
    assert delta("pagedllm:prompt_tokens_total") + delta("pagedllm:prefix_cache_hits_total") \
        == prompt_tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert delta(f"pagedllm:{name}_count") == 3, name
    assert delta("pagedllm:inter_token_latency_seconds_count") == 3 * 4
    # vLLM's per-request histograms: one observation per finished request
    for name in ("request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_time_per_output_token_seconds"):
        assert delta(f"pagedllm:{name}_count") == 3, name
    assert delta("pagedllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta("pagedllm:request_generation_tokens_sum") == 15
    assert delta("pagedllm:request_params_max_tokens_sum") == 15
    assert delta("pagedllm:request_params_n_sum") == 3
    (info,) = [dict(labels) for (name, labels), value in after.items()
               if name == "pagedllm:cache_config_info" and value == 1]
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) > 0
    assert info["enable_prefix_caching"] == "True"
    # Each request: its prompt (less cache hits), then one decode token per token after the first.
    assert delta("pagedllm:iteration_tokens_total_sum") == prompt_tokens + 3 * 4 \
        - delta("pagedllm:prefix_cache_hits_total")
