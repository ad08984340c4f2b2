"""Priority scheduling and admission control through a live server and the official openai
client: ``--scheduling-policy priority`` with ``--max-num-seqs 1`` serves a high-priority request
before earlier low-priority ones; ``--max-num-queued-reqs`` / ``--max-num-queued-tokens`` refuse
a request beyond them at once with a 503 and ``Retry-After``, and accept again once room is made.

One server for all: one request runs at a time, so the others queue for as long as a test holds
its first (streamed) request open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from tests.entrypoints.conftest import Server, launch_server

MAX_QUEUED_REQS = 4
MAX_QUEUED_TOKENS = 64
LONG_PROMPT = " ".join(["word"] * 80)  # > MAX_QUEUED_TOKENS tokens


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with launch_server("--scheduling-policy", "priority",
                       "--max-num-queued-reqs", str(MAX_QUEUED_REQS),
                       "--max-num-queued-tokens", str(MAX_QUEUED_TOKENS),
                       "--kv-cache-memory-bytes", str(256 * 2**20), max_num_seqs=1) as running:
        yield running


@contextlib.asynccontextmanager
async def occupied(client: openai.AsyncOpenAI, priority: int = 0) -> AsyncIterator[None]:
    """Holds the one running slot with a streamed request until the block ends (then aborts it
    by closing the stream)."""
    stream = await client.completions.create(
        model="", prompt="Once upon a time", max_tokens=900, stream=True,
        extra_body={"ignore_eos": True, "priority": priority})
    try:
        await stream.__anext__()  # it runs: past its prefill
        yield
    finally:
        await stream.close()


async def wait_waiting(server: Server, n: int, timeout: float = 60.0) -> None:
    """Until the core reports ``n`` requests waiting."""
    deadline = time.monotonic() + timeout
    while server.metric("pagedllm:num_requests_waiting") != n:
        assert time.monotonic() < deadline, f"never {n} waiting: {server.log_tail()}"
        await asyncio.sleep(0.05)


async def complete(client: openai.AsyncOpenAI, name: str, priority: int,
                   done: list[str], prompt: str = "Hello") -> None:
    await client.completions.create(model="", prompt=prompt, max_tokens=4,
                                    extra_body={"ignore_eos": True, "priority": priority})
    done.append(name)


def test_a_high_priority_request_is_served_before_earlier_low_priority_ones(
        server: Server) -> None:
    async def scene() -> list[str]:
        client = server.async_client()
        done: list[str] = []
        async with occupied(client, priority=10):
            tasks = []
            for name, priority in (("low-1", 10), ("low-2", 10), ("high", -10)):
                tasks.append(asyncio.create_task(complete(client, name, priority, done)))
                await wait_waiting(server, len(tasks))  # each arrives after the one before
        await asyncio.gather(*tasks)
        return done

    assert asyncio.run(scene()) == ["high", "low-1", "low-2"]


def _refused(error: openai.APIStatusError, message: str, elapsed: float) -> None:
    assert error.status_code == 503
    assert error.response.headers["retry-after"] == "1"
    body = error.response.json()["error"]
    assert body["type"] == "Service Unavailable" and body["code"] == 503
    assert body["message"] == message
    assert elapsed < 0.5, f"the refusal took {elapsed:.2f} s"


async def _timed_refusal(client: openai.AsyncOpenAI, **kwargs: object
                         ) -> tuple[openai.APIStatusError, float]:
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model="", max_tokens=4, **kwargs)  # type: ignore[call-overload]
    return info.value, time.monotonic() - start


QUEUE_FULL = ("The engine is currently busy and cannot accept new requests. Please try again "
              "later or on a different instance.")
BACKLOG = ("The engine has reached its prefill token backlog limit. Please try again later or "
           "on a different instance.")


def test_max_num_queued_reqs_refuses_at_once_then_accepts_again(server: Server) -> None:
    async def scene() -> None:
        client = server.async_client()
        done: list[str] = []
        async with occupied(client):
            tasks = [asyncio.create_task(complete(client, f"w{i}", 0, done)) for i in range(3)]
            await wait_waiting(server, 3)  # 1 running + 3 waiting = MAX_QUEUED_REQS
            error, elapsed = await _timed_refusal(client, prompt="Hi")
            _refused(error, QUEUE_FULL, elapsed)
            # The chat endpoint goes through the same door.
            start = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(
                    model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            _refused(info.value, QUEUE_FULL, time.monotonic() - start)
        await asyncio.gather(*tasks)
        ok = await client.completions.create(model="", prompt="Hi", max_tokens=2)  # room again
        assert ok.choices[0].finish_reason == "length"

    asyncio.run(scene())


def test_max_num_queued_tokens_refuses_at_once_then_accepts_again(server: Server) -> None:
    async def scene() -> None:
        client = server.async_client()
        done: list[str] = []
        async with occupied(client):
            # Waiting with a prompt longer than the cap: the backlog is full.
            task = asyncio.create_task(complete(client, "long", 0, done, LONG_PROMPT))
            await wait_waiting(server, 1)
            error, elapsed = await _timed_refusal(client, prompt="Hi")
            _refused(error, BACKLOG, elapsed)
        await task
        # Its prompt computed and the request done: the backlog is empty again.
        ok = await client.completions.create(model="", prompt=LONG_PROMPT, max_tokens=2)
        assert ok.choices[0].finish_reason == "length"

    asyncio.run(scene())


def test_priority_is_refused_without_the_priority_policy() -> None:
    # vLLM's rule and message; the server maps it to a 400 naming the field.
    from pagedllm.engine.frontend import check_priority

    check_priority(0, "fcfs")
    check_priority(3, "priority")
    with pytest.raises(ValueError, match=r"^Got priority 1 but Priority scheduling is not "
                                         r"enabled\.$"):
        check_priority(1, "fcfs")
