"""AsyncLLM: the server's front end, the asyncio client of an engine core in its own process.

The engine core steps on its own (``engine.core_proc``); this process keeps what is about text.
One front-end thread owns the request state: it tokenizes and processes images at the door,
sends requests and aborts to the core, and turns each step message into RequestOutputs
(detokenization, stop strings, n > 1), which it hands to one asyncio queue per group of
requests with ``loop.call_soon_threadsafe``, once per step. The event loop talks to it through an
inbox of commands, so it is never blocked by engine or text work. The thread sleeps in a poll
on the core's socket, its inbox and the core process itself: an idle server burns no CPU, and
if the core dies every open stream ends at once with ``EngineDeadError``.

A request that fails inside the core ends alone with ``EngineStepError``. With
``max_num_queued_reqs`` / ``max_num_queued_tokens`` set, a request beyond either is refused at the
door (``QueueOverflowError`` / ``MaxQueuedTokensError``, a 503) before it reaches the core.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from pagedllm.engine.core import EngineCore
from pagedllm.engine.core_client import EngineDeadError, utility_result
from pagedllm.engine.frontend import start_with_core
from pagedllm.engine.inputs import ProcessedPrompt, PromptType
from pagedllm.engine.messages import (
    EngineCoreInfo,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    UtilityCall,
    UtilityResult,
)
from pagedllm.engine.serial import Kind
from pagedllm.metrics.loggers import LoggingStatLogger
from pagedllm.metrics.stats import IterationStats, StatLogger, StatsCollector, scheduler_stats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = PromptType | ProcessedPrompt
__all__ = ["AsyncLLM", "EngineBusyError", "EngineDeadError", "EngineStepError",
           "MaxQueuedTokensError", "OutputStream", "QueueOverflowError"]


class EngineStepError(RuntimeError):
    """The engine failed this request (the others go on, and the server keeps serving)."""


class EngineBusyError(RuntimeError):
    """Admission control refused the request: retry later or elsewhere (HTTP 503)."""

    retry_after = 1  # seconds: a step or a few frees room; a load balancer moves on at once


class QueueOverflowError(EngineBusyError):
    """``max_num_queued_reqs`` would be exceeded (vLLM's name and message)."""

    def __init__(self) -> None:
        super().__init__("The engine is currently busy and cannot accept new requests. "
                         "Please try again later or on a different instance.")


class MaxQueuedTokensError(EngineBusyError):
    """The prompt tokens still in prefill reached ``max_num_queued_tokens`` (vLLM's name and
    message)."""

    def __init__(self) -> None:
        super().__init__("The engine has reached its prefill token backlog limit. "
                         "Please try again later or on a different instance.")


class OutputStream:
    """The outputs of requests added together, in the order the engine produced them.

    Iterate it on the event loop that added the requests; iteration ends when every request
    finished. ``close()`` aborts the unfinished ones (call it in a ``finally``: a client that went
    away must not keep its KV blocks).
    """

    def __init__(self, owner: AsyncLLM, request_ids: list[str],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request_ids = request_ids
        self._owner = owner
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = loop.create_future()
        self._unfinished = set(request_ids)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.close()  # the group's other requests end with it
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def close(self) -> None:
        """Aborts the requests not finished yet. Idempotent, non-blocking."""
        if self._unfinished:
            ids, self._unfinished = sorted(self._unfinished), set()
            self._owner.abort(ids)


@dataclass(frozen=True)
class _Add:
    requests: list[tuple[str, Prompt, SamplingParams]]
    stream: OutputStream
    arrival_time: float
    priority: int = 0


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str] | None  # None: every unfinished request
    error: BaseException | None = None  # delivered to their streams (None: nobody listens)


@dataclass(frozen=True)
class _Utility:
    method: str
    on_result: Callable[[UtilityResult], None]


_STOP = object()


class AsyncLLM:
    def __init__(self, engine_kwargs: dict[str, Any], *, engine_process: bool = True,
                 log_stats: bool = True, log_interval: float = 10.0,
                 stat_loggers: Sequence[StatLogger] = ()) -> None:
        """Starts the engine core (in its own process, or with ``engine_process=False`` on a
        thread of this one, for tests that look inside) and returns once it is ready."""
        self.frontend, self.client = start_with_core(engine_kwargs, not engine_process)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._dead_callbacks: list[Callable[[], None]] = []
        self._routes: dict[str, OutputStream] = {}  # front-end thread only
        self._calls: dict[int, Callable[[UtilityResult], None]] = {}
        self._call_ids = 0
        self._stats: EngineStats | None = None
        self._collector = StatsCollector()
        self._log = LoggingStatLogger(log_interval) if log_stats else None
        self._stat_loggers: tuple[StatLogger, ...] = tuple(stat_loggers)
        if self._log is not None:
            self._stat_loggers += (self._log,)
        self._thread = threading.Thread(target=self._run, name="pagedllm-frontend", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, *, engine_process: bool = True, log_stats: bool = True,
                         **engine_kwargs: Any) -> AsyncLLM:
        return cls(engine_kwargs, engine_process=engine_process, log_stats=log_stats)

    # --- read-only facts (set once at construction, safe from any thread) ---

    @property
    def tokenizer(self) -> Any:
        return self.frontend.tokenizer

    @property
    def model_name(self) -> str:
        return self.frontend.model_name

    @property
    def max_model_len(self) -> int:
        return self.frontend.max_model_len

    @property
    def config(self) -> Any:
        return self.frontend.config

    @property
    def default_sampling(self) -> dict[str, Any]:
        """What requests' unset sampling fields take (the model's generation_config.json)."""
        return self.frontend.default_sampling

    @property
    def core_info(self) -> EngineCoreInfo:
        assert self.client.info is not None  # set once the core is ready
        return self.client.info

    @property
    def core(self) -> EngineCore:
        """The engine core, with ``engine_process=False`` only (tests look inside)."""
        if self.client.core is None:
            raise RuntimeError("the engine core runs in another process")
        return self.client.core

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Adds a stat logger and shows it the engine's current state (pool size, ...)."""
        self._stat_loggers = (*self._stat_loggers, stat_logger)

        def show(result: UtilityResult) -> None:
            if result.error is None:
                stat_logger.record(scheduler_stats(result.result), IterationStats())

        self._send(_Utility("get_stats", show), quiet=True)

    def on_dead(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (on the front-end thread) if the engine core dies."""
        self._dead_callbacks.append(callback)

    # --- the event loop's side ---

    async def add_requests(self, requests: Sequence[tuple[str, Prompt, SamplingParams]],
                           priority: int = 0) -> OutputStream:
        """Adds the requests at once (all or none): raises ``ValueError`` for a bad one, and
        ``EngineBusyError`` beyond the queue limits, before any output. ``priority`` (lower
        first) needs ``scheduling_policy="priority"``. The returned stream must be closed by the
        caller."""
        loop = asyncio.get_running_loop()
        stream = OutputStream(self, [r[0] for r in requests], loop)
        self._send(_Add(list(requests), stream, time.monotonic(), priority))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """One request's outputs; abandoning the iteration (cancel, ``aclose``) aborts it."""
        stream = await self.add_requests([(request_id, prompt, params)], priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_ids: list[str], error: BaseException | None = None) -> None:
        """Aborts the requests and frees their KV blocks; with ``error``, their streams get it
        as their last item."""
        if request_ids:
            self._send(_Abort(list(request_ids), error), quiet=True)

    def abort_all(self, error: BaseException) -> None:
        """Ends every unfinished request with ``error`` (a server that stops draining)."""
        self._send(_Abort(None, error), quiet=True)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._routes)

    async def get_stats(self) -> EngineStats:
        """The core's counters, after every command sent before this one took effect."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: UtilityResult) -> None:
            try:
                value, error = utility_result(result), None
            except RuntimeError as e:
                value, error = None, e
            _resolve(future, value, error)

        self._send(_Utility("get_stats", settle))
        return await future

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._send(_STOP, quiet=True)
        self._thread.join(timeout)
        self.client.shutdown()
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _send(self, command: Any, quiet: bool = False) -> None:
        with self._lock:  # the front-end thread marks itself dead under this lock
            if self._dead is None:
                self._inbox.put(command)
                try:
                    os.write(self._wake_write, b"\0")
                except BlockingIOError:  # the pipe is full of wake-ups already
                    pass
                return
        if not quiet:
            raise EngineDeadError(str(self._dead))

    # --- the front-end thread's side ---

    def _run(self) -> None:
        if self._log is not None:
            self._log.start_interval()
        try:
            self._serve()
        except EngineDeadError as e:
            logger.error("%s", e)
            self._die(e, unexpected=True)
        except BaseException as e:
            logger.exception("The front-end loop died")
            self._die(EngineDeadError(f"The front end failed: {type(e).__name__}: {e}"),
                      unexpected=True)
        else:
            self._die(EngineDeadError("The engine stopped."), unexpected=False)

    def _serve(self) -> None:
        client = self.client
        poller = zmq.Poller()
        poller.register(client.output_socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        if client.sentinel is not None:
            poller.register(client.sentinel, zmq.POLLIN)
        while True:
            timeout = 1000.0  # ms; also how often a core without a sentinel is checked
            if self._log is not None and self._log.pending:
                timeout = min(timeout, 1000 * self._log.seconds_to_next())
            events = dict(poller.poll(timeout))
            if self._wake_read in events:
                os.read(self._wake_read, 4096)
            while True:
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if command is _STOP:
                    return
                self._handle(command)
            while client.output_socket.poll(0):
                self._on_message(*client.receive())
            if not client.alive:
                raise EngineDeadError(f"The engine core died ({client.exit_description}).")
            if self._log is not None:
                self._log.maybe_log()

    def _handle(self, command: _Add | _Abort | _Utility) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            self._abort(command)
        else:
            self._call_ids += 1
            self._calls[self._call_ids] = command.on_result
            self.client.send(Kind.UTILITY, UtilityCall(self._call_ids, command.method))

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        core_requests: list[EngineCoreRequest] = []
        try:
            self._check_admission(command.requests)
            for request_id, prompt, params in command.requests:
                if request_id in self._routes:
                    raise ValueError(f"Request id {request_id!r} is already in use.")
                core_requests += self.frontend.add(request_id, prompt, params,
                                                   command.arrival_time, command.priority)
                added.append(request_id)
                self._routes[request_id] = command.stream
                self._collector.add_request(request_id, params)
        except Exception as e:
            self._undo_add(added, command, e)
            return
        sent: list[str] = []
        try:  # all accepted: only now does anything reach the core
            for core_request in core_requests:
                self.client.add_request(core_request)
                sent.append(core_request.request_id)
        except Exception as e:  # noqa: BLE001 - a value the core's messages cannot carry
            if sent:
                self.client.abort_requests(sent)
            self._undo_add(added, command, ValueError(
                f"The request could not be sent to the engine: {type(e).__name__}: {e}"))
            return
        _resolve(command.stream.accepted, None)

    def _undo_add(self, added: list[str], command: _Add, error: Exception) -> None:
        """A group refused whole: its requests are forgotten, its stream gets the error."""
        for request_id in added:
            del self._routes[request_id]
            self.frontend.abort(request_id)
        self._collector.forget(added)
        _resolve(command.stream.accepted, error=error)

    def _check_admission(self, requests: list[tuple[str, Prompt, SamplingParams]]) -> None:
        """vLLM's admission control, on the thread that owns the counts (so a burst is counted
        exactly). A group is refused whole: its samples count against max_num_queued_reqs
        together; the token check is vLLM's, "already at the limit", not "would pass it"."""
        sched = self.config.scheduler
        counts = self.frontend.output_processor
        if sched.max_num_queued_reqs is not None:
            n = sum(params.n for _, _, params in requests)
            if counts.num_unfinished_samples + n > sched.max_num_queued_reqs:
                logger.info("Request queue full - rejecting request %s (current=%d, n=%d, "
                            "max=%d).", requests[0][0] if requests else None,
                            counts.num_unfinished_samples, n, sched.max_num_queued_reqs)
                raise QueueOverflowError()
        if sched.max_num_queued_tokens is not None:
            if counts.num_prefill_tokens >= sched.max_num_queued_tokens:
                logger.info("Max queued tokens reached - rejecting request %s "
                            "(current_tokens=%d, max=%d).",
                            requests[0][0] if requests else None, counts.num_prefill_tokens,
                            sched.max_num_queued_tokens)
                raise MaxQueuedTokensError()

    def _abort(self, command: _Abort) -> None:
        ids = list(self._routes) if command.request_ids is None else \
            [i for i in command.request_ids if i in self._routes]
        if not ids:
            return
        items = []
        core_ids: list[str] = []
        for request_id in ids:
            stream = self._routes.pop(request_id)
            core_ids += self.frontend.abort(request_id)
            if command.error is not None:
                items.append((stream, command.error))
        if core_ids:
            self.client.abort_requests(core_ids)
        if self._stats is not None:
            reason = "abort" if command.error is None else "error"
            self._record(self._collector.record_ended(self._stats, ids, reason))
        _deliver(_unique(items))

    def _on_message(self, kind: Kind, message: Any) -> None:
        if kind is Kind.OUTPUTS:
            self._on_outputs(message)
        elif kind is Kind.RESULT:
            on_result = self._calls.pop(message.call_id, None)
            if on_result is not None:
                on_result(message)
        elif kind is Kind.FAILED:
            raise EngineDeadError(f"The engine core failed: {message}")

    def _on_outputs(self, message: EngineCoreOutputs) -> None:
        self._stats = message.stats
        result = self.frontend.process(message, time.monotonic())
        if result.to_abort:
            self.client.abort_requests(result.to_abort)
        items: list[tuple[OutputStream, Any]] = []
        for out in result.outputs:
            stream = self._routes.get(out.request_id)
            if stream is None or out.request_id in result.errors:
                continue
            if out.finished:
                del self._routes[out.request_id]
            items.append((stream, out))
        # Stats first: a client that has its answer then sees it counted in /metrics.
        self._record(self._collector.record_step(message.stats, result.outputs)
                     if message.is_step else self._collector.record_state(message.stats))
        _deliver(items)
        for request_id, error in result.errors.items():  # each failed request ends alone
            self._abort(_Abort([request_id], EngineStepError(f"The engine failed: {error}")))

    def _record(self, stats: tuple[Any, Any]) -> None:
        for stat_logger in self._stat_loggers:
            try:
                stat_logger.record(*stats)
            except Exception:
                logger.exception("Stat logger %r failed", stat_logger)

    def _die(self, error: BaseException, unexpected: bool) -> None:
        with self._lock:
            self._dead = error
        streams = {id(s): s for s in self._routes.values()}
        self._routes.clear()
        _deliver([(s, error) for s in streams.values()])
        for on_result in self._calls.values():
            on_result(UtilityResult(0, error=str(error)))
        self._calls.clear()
        while True:  # commands that raced the end
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                _resolve(command.stream.accepted, error=error)
            elif isinstance(command, _Utility):
                command.on_result(UtilityResult(0, error=str(error)))
        if unexpected:
            for callback in self._dead_callbacks:
                try:
                    callback()
                except Exception:
                    logger.exception("An engine-death callback failed")


def _unique(items: list[tuple[OutputStream, Any]]) -> list[tuple[OutputStream, Any]]:
    """One error per stream (a stream of n requests ends once)."""
    seen: set[int] = set()
    return [(s, e) for s, e in items if id(s) not in seen and not seen.add(id(s))]


def _deliver(items: list[tuple[OutputStream, Any]]) -> None:
    """Hands outputs to their event loops: one callback per loop per step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, Any]]] = defaultdict(list)
    for stream, item in items:
        by_loop[stream.loop].append((stream, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(batch: list[tuple[OutputStream, Any]]) -> None:
    for stream, item in batch:
        stream.queue.put_nowait(item)


def _resolve(future: asyncio.Future[Any], result: Any = None,
             error: BaseException | None = None) -> None:
    """Settles an event-loop future from the front-end thread."""
    try:
        future.get_loop().call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop is closed
        pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(result) if error is None else future.set_exception(error)
