"""AsyncLLM: the asyncio front of ``LLMEngine``.

One background thread owns the engine (which is not thread-safe): it builds it, adds and aborts
requests, and steps it while requests are unfinished. The event loop talks to it through a
thread-safe inbox of commands and receives outputs through one asyncio queue per group of
requests, filled with ``loop.call_soon_threadsafe`` once per step. When nothing is unfinished the
thread sleeps on the inbox, so an idle server burns no CPU and the event loop is never blocked by
engine work. An exception in a step fails the requests in flight, not the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pagedllm.engine.inputs import ProcessedPrompt, PromptType
from pagedllm.metrics.loggers import LoggingStatLogger
from pagedllm.metrics.stats import IterationStats, StatLogger, StatsCollector, scheduler_stats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.llm_engine import EngineStats, LLMEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")
Prompt = PromptType | ProcessedPrompt


class EngineDeadError(RuntimeError):
    """The engine thread is gone (shut down, or failed to start)."""


class EngineStepError(RuntimeError):
    """The engine failed while this request was in flight; the server keeps serving."""


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
            self._unfinished.clear()  # the engine thread has dropped these requests
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


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str]


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any] | None = None  # None: nobody waits for the result


_STOP = object()


class AsyncLLM:
    def __init__(self, engine_factory: Callable[[], LLMEngine], *, log_stats: bool = True,
                 log_interval: float = 10.0, stat_loggers: Sequence[StatLogger] = ()) -> None:
        """``engine_factory`` runs on the engine thread, so that torch's thread-local state (such
        as inference mode) is set where the engine runs. Returns once the engine is built."""
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._dead = False
        self._routes: dict[str, OutputStream] = {}  # engine thread only
        self._collector = StatsCollector()  # engine thread only
        self._log = LoggingStatLogger(log_interval) if log_stats else None
        self._stat_loggers: tuple[StatLogger, ...] = tuple(stat_loggers)
        if self._log is not None:
            self._stat_loggers += (self._log,)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.engine: LLMEngine
        self._thread = threading.Thread(target=self._run, args=(engine_factory,),
                                        name="pagedllm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    @classmethod
    def from_engine_args(cls, *, log_stats: bool = True, **engine_kwargs: Any) -> AsyncLLM:
        """Builds the engine (pagedllm.config field names) on the engine thread."""
        from pagedllm.engine.llm_engine import LLMEngine

        return cls(lambda: LLMEngine.from_engine_args(**engine_kwargs), log_stats=log_stats)

    # --- read-only engine facts (set once at construction, safe from any thread) ---

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.model.max_model_len)

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Adds a stat logger and shows it the engine's current state (pool size, ...)."""
        self._stat_loggers = (*self._stat_loggers, stat_logger)

        def show(engine: LLMEngine) -> None:
            stat_logger.record(scheduler_stats(engine.get_stats()), IterationStats())

        self._send(_Call(show), quiet=True)

    # --- the event loop's side ---

    async def add_requests(self, requests: Sequence[tuple[str, Prompt, SamplingParams]]
                           ) -> OutputStream:
        """Adds the requests at once (all or none): raises the engine's ``ValueError`` for a bad
        one, before any output. The returned stream must be closed by the caller."""
        loop = asyncio.get_running_loop()
        stream = OutputStream(self, [r[0] for r in requests], loop)
        self._send(_Add(list(requests), stream, time.monotonic()))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """One request's outputs; abandoning the iteration (cancel, ``aclose``) aborts it."""
        stream = await self.add_requests([(request_id, prompt, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_ids: list[str]) -> None:
        """Aborts the requests and frees their KV blocks on the engine's next turn."""
        if request_ids:
            self._send(_Abort(list(request_ids)), quiet=True)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs ``fn(engine)`` on the engine thread, between steps."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._send(_Call(fn, future))
        return await future

    async def get_stats(self) -> EngineStats:
        return await self.call(lambda engine: engine.get_stats())

    def check_health(self) -> None:
        if self._dead or not self._thread.is_alive():
            raise EngineDeadError("The engine thread is not running.")

    def shutdown(self, timeout: float = 10.0) -> None:
        self._send(_STOP, quiet=True)
        self._thread.join(timeout)

    def _send(self, command: Any, quiet: bool = False) -> None:
        with self._lock:  # the engine thread marks itself dead under this lock
            if not self._dead:
                self._inbox.put(command)
                return
        if not quiet:
            raise EngineDeadError("The engine is not running.")

    # --- the engine thread's side ---

    def _run(self, factory: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = factory()
        except BaseException as e:  # reported by the constructor, on the caller's thread
            self._startup_error = e
            self._dead = True
            self._ready.set()
            return
        if self._log is not None:
            self._log.start_interval()  # the first interval starts once the engine is up
        self._ready.set()
        try:
            self._serve()
        except BaseException:
            logger.exception("The engine loop died")
        finally:
            self._die()

    def _serve(self) -> None:
        engine = self.engine
        while True:
            busy = engine.has_unfinished_requests()
            command = self._next_command(block=not busy)
            added = False
            while command is not None:
                if command is _STOP:
                    return
                self._handle(command)
                added = added or isinstance(command, _Add)
                command = self._next_command(block=False)
            if added:  # gauges show new arrivals as waiting before the (maybe long) step
                self._record(self._collector.record_state(engine.get_stats()))
            if engine.has_unfinished_requests():
                self._step()
            if self._log is not None:
                self._log.maybe_log()

    def _next_command(self, block: bool) -> Any:
        timeout = None
        if self._log is not None and self._log.pending:
            timeout = self._log.seconds_to_next()  # wake up to print the last busy line
        try:
            return self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            ids = [i for i in command.request_ids if i in self._routes]
            if ids:
                for request_id in ids:
                    del self._routes[request_id]
                self.engine.abort_request(ids)
                self._record(self._collector.record_ended(self.engine.get_stats(), ids, "abort"))
        else:
            try:
                result = command.fn(self.engine)
            except Exception as e:
                if command.future is None:
                    logger.exception("Engine call %r failed", command.fn)
                    return
                _resolve(command.future, error=e)
                return
            if command.future is not None:
                _resolve(command.future, result)

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            for request_id, prompt, params in command.requests:
                if request_id in self._routes:
                    raise ValueError(f"Request id {request_id!r} is already in use.")
                self.engine.add_request(request_id, prompt, params,
                                        arrival_time=command.arrival_time)
                added.append(request_id)
                self._routes[request_id] = command.stream
                self._collector.add_request(request_id, params.output_kind)
        except Exception as e:
            for request_id in added:
                self._routes.pop(request_id, None)
            if added:
                self.engine.abort_request(added)
                self._collector.forget(added)
            _resolve(command.stream.accepted, error=e)
            return
        _resolve(command.stream.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("Engine step failed; failing the %d requests in flight",
                             len(self._routes))
            self._fail_all(EngineStepError(f"The engine failed: {type(e).__name__}: {e}"))
            time.sleep(0.01)  # a step that fails at once must not spin hot
            return
        items: list[tuple[OutputStream, Any]] = []
        for out in outputs:
            stream = self._routes.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._routes[out.request_id]
            items.append((stream, out))
        # Stats first: a client that has its answer then sees it counted in /metrics.
        self._record(self._collector.record_step(self.engine.get_stats(), outputs))
        _deliver(items)

    def _fail_all(self, error: BaseException) -> None:
        ids = list(self._routes)
        streams = {id(s): s for s in self._routes.values()}
        self._routes.clear()
        _deliver([(s, error) for s in streams.values()])
        if not ids:
            return
        try:
            self.engine.abort_request(ids)
            self._record(self._collector.record_ended(self.engine.get_stats(), ids, "error"))
        except Exception:
            logger.exception("Aborting the failed requests failed too")

    def _record(self, stats: tuple[Any, Any]) -> None:
        for stat_logger in self._stat_loggers:
            try:
                stat_logger.record(*stats)
            except Exception:
                logger.exception("Stat logger %r failed", stat_logger)

    def _die(self) -> None:
        with self._lock:
            self._dead = True
        error = EngineDeadError("The engine stopped.")
        self._fail_all(error)
        while True:  # commands that raced the shutdown
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                _resolve(command.stream.accepted, error=error)
            elif isinstance(command, _Call) and command.future is not None:
                _resolve(command.future, error=error)


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
    """Settles an event-loop future from the engine thread."""
    try:
        future.get_loop().call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop is closed
        pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(result) if error is None else future.set_exception(error)
