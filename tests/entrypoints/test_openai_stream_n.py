"""Streamed chat and completions with n > 1: every choice ends, and ``[DONE]`` comes last.

The OpenAPI fuzzer once reported a streamed chat with n > 1 that ended without ``[DONE]``. These
read every SSE line (raw httpx) over the cases it sends: n 2 to 4, max_tokens 1 to a few, greedy
and sampled, usage on and off, logprobs, stop strings, echo, json_object; and the same through
the official ``openai`` client. Each stream must give every choice index a finish_reason on
exactly one chunk, the usage chunk when asked (last before ``[DONE]``, no choices), and end
with ``[DONE]``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest

from tests.entrypoints.conftest import Server

MESSAGES = [{"role": "user", "content": "Say something."}]


def _stream(server: Server, path: str, body: dict[str, Any]) -> list[str]:
    """The ``data:`` payloads of a streamed answer, in order (``[DONE]`` included)."""
    payloads = []
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True},
                      headers=server.auth, timeout=120) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: "), line
                payloads.append(line[len("data: "):])
    return payloads


def _check(payloads: list[str], n: int, include_usage: bool) -> list[dict[str, Any]]:
    text = "\n".join(payloads)[-3000:]
    assert payloads and payloads[-1] == "[DONE]", text
    assert payloads.count("[DONE]") == 1, text
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("error" not in c for c in chunks), text
    finishes: dict[int, int] = {}
    for c in chunks:
        for choice in c["choices"]:
            assert 0 <= choice["index"] < n, text
            if choice["finish_reason"] is not None:
                finishes[choice["index"]] = finishes.get(choice["index"], 0) + 1
    assert finishes == dict.fromkeys(range(n), 1), text  # every choice ends, once
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"] is not None, text
        assert usage_chunks == [last], text
        assert last["usage"]["completion_tokens"] >= n, text  # at least one token per choice
    else:
        assert not usage_chunks, text
    return chunks


@pytest.mark.parametrize("n", [2, 3, 4])
def test_streamed_chat_n_every_choice_ends_then_done(server: Server, n: int) -> None:
    extras: list[dict[str, Any]] = [
        {}, {"logprobs": True, "top_logprobs": 2}, {"stop": ["e", "."]}, {"echo": True},
        {"response_format": {"type": "json_object"}}, {"return_token_ids": True},
    ]
    for max_tokens, temperature, usage, extra in itertools.product(
            [1, 2, 5], [0.0, 1.0], [None, True, False], extras):
        body: dict[str, Any] = {"messages": MESSAGES, "n": n, "max_tokens": max_tokens,
                                "temperature": temperature, **extra}
        if usage is not None:
            body["stream_options"] = {"include_usage": usage}
        payloads = _stream(server, "/chat/completions", body)
        try:
            chunks = _check(payloads, n, bool(usage))
        except AssertionError as e:
            raise AssertionError(f"{body}\n{e}") from None
        roles = [c["choices"][0]["index"] for c in chunks
                 if c["choices"] and c["choices"][0]["delta"].get("role") == "assistant"]
        assert roles == list(range(n)), body  # each choice's role chunk, first


@pytest.mark.parametrize("n", [2, 4])
def test_streamed_completion_n_every_choice_ends_then_done(server: Server, n: int) -> None:
    for max_tokens, temperature, usage, extra in itertools.product(
            [1, 5], [0.0, 1.0], [None, True], [{}, {"logprobs": 2}, {"echo": True}]):
        body: dict[str, Any] = {"prompt": "Once upon a time", "n": n, "max_tokens": max_tokens,
                                "temperature": temperature, **extra}
        if usage is not None:
            body["stream_options"] = {"include_usage": usage}
        try:
            _check(_stream(server, "/completions", body), n, bool(usage))
        except AssertionError as e:
            raise AssertionError(f"{body}\n{e}") from None


def test_openai_client_streamed_chat_n(server: Server) -> None:
    client = server.client()
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=MESSAGES,  # type: ignore[arg-type]
        n=3, max_tokens=4, temperature=1.0, logprobs=True, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)  # the client reads up to [DONE] (the raw tests check it is there)
    finish = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices
              if c.finish_reason is not None}
    assert set(finish) == {0, 1, 2}
    assert all(reason in ("stop", "length") for reason in finish.values())
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 3
