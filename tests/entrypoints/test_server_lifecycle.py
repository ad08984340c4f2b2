"""The server's life with its engine core in a child process: the core dying, the server killed,
and a graceful stop (SIGTERM) while streams run. Each test starts its own ``pagedllm serve``."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from tests.entrypoints.conftest import Server, launch_server
from tests.processes import engine_core_pids, wait_gone

pytestmark = pytest.mark.slow

NUM_STREAMS = 16
LONG = 1000  # tokens: longer than the test lasts (max_model_len is 1024)


async def _stream(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int,
                  started: asyncio.Event, counter: list[int]) -> tuple[int, str | None]:
    """(tokens generated, finish reason) of one streamed completion, from its last events."""
    stream = await client.completions.create(
        model=model, prompt=f"Story number {i}:", max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens, reason, first = 0, None, True
    async for chunk in stream:
        if chunk.choices:
            if first:
                first = False
                counter[0] += 1
                if counter[0] == NUM_STREAMS:
                    started.set()
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, reason


async def _streams_then(server: Server, max_tokens: int, action) -> list:  # noqa: ANN001
    """Starts NUM_STREAMS streams, runs ``action()`` once each has its first token, and returns
    each stream's result or exception with the time it ended (seconds after the action)."""
    client = server.async_client()
    model = (await client.models.list()).data[0].id
    started, counter = asyncio.Event(), [0]
    acted: list[float] = []

    async def timed(i: int) -> tuple[object, float]:
        try:
            result: object = await _stream(client, model, i, max_tokens, started, counter)
        except Exception as e:
            result = e
        return result, time.monotonic()

    tasks = [asyncio.create_task(timed(i)) for i in range(NUM_STREAMS)]
    await asyncio.wait_for(started.wait(), 120)
    action()
    acted.append(time.monotonic())
    done = await asyncio.gather(*tasks)
    return [(result, end - acted[0]) for result, end in done]


def test_killing_the_core_ends_every_stream_and_the_server() -> None:
    with launch_server() as server:
        (core,) = engine_core_pids(server.process.pid)
        results = asyncio.run(_streams_then(server, LONG, lambda: os.kill(core, signal.SIGKILL)))
        for result, seconds in results:
            assert isinstance(result, openai.APIError), result  # an error event ended it
            assert "engine core died" in str(result), result
            assert seconds < 5.0
        assert server.process.wait(30) != 0  # the server went down with its core
        assert "engine core died" in server.log_tail()


def test_killing_the_server_takes_the_core_down() -> None:
    with launch_server() as server:
        (core,) = engine_core_pids(server.process.pid)
        server.process.kill()
        server.process.wait()
        assert not wait_gone([core], 5.0), "the engine core outlived its killed server"


def test_sigterm_lets_streams_finish_then_stops() -> None:
    with launch_server() as server:
        cores = engine_core_pids(server.process.pid)
        refused: list[int] = []

        def terminate() -> None:
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # the drain has begun: new work is refused, the rest goes on
            refused.append(httpx.post(server.base_url + "/completions", headers=server.auth,
                                      json={"prompt": "Hi", "max_tokens": 2}).status_code)

        results = asyncio.run(_streams_then(server, 48, terminate))
        for result, _ in results:
            assert result == (48, "length"), result  # whole, not cut
        assert refused == [503]
        assert server.process.wait(30) == 0
        assert not wait_gone(cores, 5.0)


def test_sigterm_past_the_shutdown_timeout_ends_streams_with_an_error_event() -> None:
    with launch_server("--shutdown-timeout", "1") as server:
        results = asyncio.run(_streams_then(
            server, LONG, lambda: server.process.send_signal(signal.SIGTERM)))
        for result, seconds in results:
            assert isinstance(result, openai.APIError), result
            assert "shutting down" in str(result)
            assert seconds < 10.0
        assert server.process.wait(30) == 0
