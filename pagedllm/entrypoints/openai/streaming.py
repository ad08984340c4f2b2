"""Server-sent events and client disconnects.

A streamed response is ``data: {json}\\n\\n`` chunks ending with ``data: [DONE]``. Whatever ends
a response (finished, client gone, error), its requests are closed, which aborts the unfinished
ones and frees their KV blocks at once; non-streamed requests are raced against the client's
disconnect for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import to_api_error
from pagedllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def sse_stream(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """The chunks as SSE events, then ``[DONE]``; an error mid-stream becomes an error event
    (the status line has been sent already)."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        yield sse(to_api_error(e).body())
    yield DONE


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that calls ``on_close`` however it ends, even if the
    client left before the first byte and the body iterator never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``, cancelling it (its ``finally`` aborts its requests) if the client leaves.

    Raises ``ClientDisconnected`` in that case; the answer would reach nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            logger.debug("Client disconnected from %s", request.url.path)
            return


class Outputs(Protocol):
    """A request's outputs as they come (``AsyncLLM``'s ``OutputStream``, or a beam search's
    ``BeamStream``); ``close()`` aborts what is not finished."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None: ...


class ResponseJob(Protocol):
    """One request's answer, as SSE chunks or as one body, from its outputs."""

    def chunks(self, stream: Outputs) -> AsyncIterator[BaseModel]: ...

    async def response(self, stream: Outputs) -> BaseModel: ...


async def respond(raw: Request, job: ResponseJob, stream: Outputs,
                  streaming: bool) -> Response:
    """Streams the job's chunks, or waits for its whole response (aborting if the client
    goes away); either way the output stream is closed at the end."""
    if streaming:
        return SSEResponse(sse_stream(job.chunks(stream)), on_close=stream.close)
    try:
        response = await until_disconnected(raw, job.response(stream))
    finally:
        stream.close()
    return Response(response.model_dump_json(), media_type="application/json")
