"""A word-level fake tokenizer and an in-process OpenAI-shaped streaming server for the benchmarks.

The server streams ``max_tokens`` tokens, ``tokens_per_chunk`` per SSE chunk, then a bare
finish chunk and a usage chunk; its prompt count is the prompt's word count plus one (a BOS), plus
``IMAGE_TOKENS`` per image_url part of a chat message. A prompt containing "FAIL" gets HTTP 500.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

BOS = 0
IMAGE_TOKENS = 10  # what the fake server counts per image


class WordTokenizer:
    """Token i is the word "w<i>"; every other word hashes to an id. encode() adds a BOS."""

    vocab_size = 500
    all_special_ids = [BOS]

    def encode(self, text: str) -> list[int]:
        ids = [BOS]
        for word in text.split():
            if word[:1] == "w" and word[1:].isdigit() and 0 < int(word[1:]) < self.vocab_size:
                ids.append(int(word[1:]))
            else:
                ids.append(1 + sum(map(ord, word)) % (self.vocab_size - 1))
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(f" w{i}" for i in ids if i != BOS)


@dataclass
class FakeServer:
    tokens_per_chunk: int = 1
    delay_s: float = 0.002
    send_usage: bool = True
    model: str = "fake-model"
    payloads: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0

    @staticmethod
    def prompt_tokens(text: str, num_images: int = 0) -> int:
        """What the server reports as a prompt's token count."""
        return len(text.split()) + 1 + IMAGE_TOKENS * num_images

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.payloads.append(body)
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        num_images = 0
        if isinstance(prompt, list):  # content parts: text and image_url
            num_images = sum(part["type"] == "image_url" for part in prompt)
            prompt = " ".join(part["text"] for part in prompt if part["type"] == "text")
        if "FAIL" in prompt:
            return web.Response(status=500, text="injected failure")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body, self.prompt_tokens(prompt, num_images),
                                      chat)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict, prompt_tokens: int,
                      chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await response.write(f"data: {data}\n\n".encode())

        def choice(text: str, finish: str | None = None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        if chat:  # a role header with no text comes first, as OpenAI servers send it
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        n = body["max_tokens"]
        for start in range(0, n, self.tokens_per_chunk):
            await asyncio.sleep(self.delay_s)
            k = min(self.tokens_per_chunk, n - start)
            await send({"choices": [choice(" tok" * k)]})
        await send({"choices": [choice("", "length")]})
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            p = prompt_tokens
            await send({"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": n,
                                                 "total_tokens": p + n}})
        await send("[DONE]")
        await response.write_eof()
        return response

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _serve_in_thread(server: FakeServer) -> Iterator[FakeServer]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server.port = sock.getsockname()[1]
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def tokenizer() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    """A running FakeServer; parametrize indirectly with a dict of FakeServer fields."""
    options = getattr(request, "param", {})
    yield from _serve_in_thread(FakeServer(**options))
