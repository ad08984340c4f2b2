"""One streaming OpenAI request, timed chunk by chunk -> ``RequestResult``.

Definitions (vLLM's): TTFT is the time from sending the request to the first chunk that carries
text; every later text chunk adds one inter-token latency (ITL) entry, however many tokens it
carries; the end-to-end latency ends at the last chunk with choices. Token counts come from the
usage chunk that ``stream_options: {"include_usage": true}`` asks for. Unlike vLLM, chunks with
empty text (a chat role header, a bare finish_reason) are not counted as tokens.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

# Generous: a request waits behind a whole benchmark's queue at worst.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)


@dataclass(frozen=True)
class RequestInput:
    api_url: str  # full URL: base + /v1/completions or /v1/chat/completions
    model: str
    prompt: str
    max_tokens: int
    prompt_len: int = 0  # client-side estimate, used only if the server sends no usage
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None  # merged into the JSON body (server-specific)
    images: tuple[str, ...] = ()  # image URLs (data URLs), sent as image_url parts after the text

    def __post_init__(self) -> None:
        if self.images and not self.is_chat:
            raise ValueError(f"images need the chat endpoint (/v1/chat/completions), not "
                             f"{self.api_url}")

    @property
    def is_chat(self) -> bool:
        return self.api_url.rstrip("/").endswith("chat/completions")


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between consecutive text chunks
    latency: float = 0.0  # seconds, to the last chunk with choices
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False  # False: token counts are estimates (prompt_len, text chunks)
    generated_text: str = ""

    def token_times(self) -> list[float]:
        """perf_counter() arrival time of each text chunk."""
        if not self.success:
            return []
        times = [self.start_time + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times


def build_payload(request: RequestInput) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.images:
        content = [{"type": "text", "text": request.prompt}] + [
            {"type": "image_url", "image_url": {"url": url}} for url in request.images]
        payload["messages"] = [{"role": "user", "content": content}]
    elif request.is_chat:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if request.ignore_eos:
        payload["ignore_eos"] = True
    return {**payload, **(request.extra_body or {})}


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _chunk_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The payload of each ``data:`` line, as soon as its line is complete."""
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            text = line.strip().decode("utf-8")
            if text.startswith("data:"):
                yield text[len("data:"):].strip()
    if buffer.strip().startswith(b"data:"):
        yield buffer.strip()[len(b"data:"):].strip().decode("utf-8")


async def send_request(session: aiohttp.ClientSession, request: RequestInput) -> RequestResult:
    """Send one streaming request and time it; never raises for server or network errors."""
    result = RequestResult(prompt_tokens=request.prompt_len)
    chunks_with_text = 0
    last_choice_time = last_text_time = 0.0
    result.start_time = time.perf_counter()
    try:
        async with session.post(request.api_url, json=build_payload(request),
                                headers=_headers()) as response:
            if response.status != 200:
                body = (await response.text())[:500]
                result.error = f"HTTP {response.status}: {body}"
                return result
            async for data in _sse_data(response):
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"server error in stream: {chunk['error']}"
                    return result
                if usage := chunk.get("usage"):
                    result.prompt_tokens = int(usage.get("prompt_tokens", result.prompt_tokens))
                    result.output_tokens = int(usage.get("completion_tokens", 0))
                    result.usage_reported = True
                if choices := chunk.get("choices"):
                    last_choice_time = now
                    text = _chunk_text(choices[0])
                    if text:
                        if chunks_with_text == 0:
                            result.ttft = now - result.start_time
                        else:
                            result.itl.append(now - last_text_time)
                        last_text_time = now
                        chunks_with_text += 1
                        result.generated_text += text
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if chunks_with_text == 0:
        result.error = "the stream carried no text: cannot measure TTFT"
        return result
    result.latency = last_choice_time - result.start_time
    if not result.usage_reported:
        result.output_tokens = chunks_with_text  # best guess; the report warns about it
    result.success = True
    return result


async def fetch_model_id(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model a server lists at ``/v1/models``."""
    async with session.get(f"{base_url.rstrip('/')}/v1/models", headers=_headers()) as response:
        response.raise_for_status()
        data = await response.json()
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])
