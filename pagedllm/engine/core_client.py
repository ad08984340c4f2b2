"""How a front end drives the engine core: in this process, or in a process of its own.

Both clients take ``EngineCoreRequest``s and aborts and give back ``EngineCoreOutputs``, one per
step. ``InprocClient`` steps the core when asked (the offline ``LLM``'s default: no copies, no
second interpreter). ``MPClient`` starts ``engine.core_proc`` as a child process that steps on its
own while requests are unfinished, so the front end's work (HTTP, text) overlaps the model's.
The child is never orphaned: it exits when its parent's process is gone, and the client kills
it when the client is collected or the interpreter exits.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from typing import Any

import zmq

from pagedllm.engine.core import EngineCore
from pagedllm.engine.core_proc import run_engine_core
from pagedllm.engine.messages import (
    EngineCoreInfo,
    EngineCoreOutputs,
    EngineCoreRequest,
    UtilityCall,
    UtilityResult,
)
from pagedllm.engine.serial import Decoder, Encoder, Kind

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core is gone (shut down, failed to start, or died)."""


class InprocClient:
    """The core in this process; ``get_output`` runs one step."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        self.core = EngineCore.from_engine_args(**engine_kwargs)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.core.step()

    def call_utility(self, method: str) -> Any:
        return getattr(self.core, method)()


class MPClient:
    """The core in a child process (or, ``in_thread=True``, on a thread of this one, for tests
    that look inside it), over two ZeroMQ sockets.

    Not thread-safe: one thread sends and receives. ``output_socket`` and ``sentinel`` (a file
    descriptor readable once the child has exited, or None) are for callers that poll.
    """

    def __init__(self, engine_kwargs: dict[str, Any], in_thread: bool = False) -> None:
        self._ctx = zmq.Context()
        self._dir = None if in_thread else tempfile.mkdtemp(prefix="pagedllm-core-")
        base = f"inproc://pagedllm-core-{id(self)}" if in_thread else f"ipc://{self._dir}"
        self.input_socket = self._ctx.socket(zmq.PUSH)
        self.input_socket.bind(f"{base}/input")
        self.output_socket = self._ctx.socket(zmq.PULL)
        self.output_socket.bind(f"{base}/output")
        self._encoder, self._decoder = Encoder(), Decoder()
        self._call_ids = itertools.count()
        self.core: EngineCore | None = None  # in_thread only
        self.proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.sentinel: int | None = None
        if in_thread:
            self._thread = threading.Thread(
                target=self._run_in_thread, args=(engine_kwargs, base), daemon=True,
                name="pagedllm-core")
            self._thread.start()
        else:
            self.proc = start_child("pagedllm.engine.core_proc", engine_kwargs,
                                    ["--input", f"{base}/input", "--output", f"{base}/output"])
            self.sentinel = _pidfd(self.proc.pid)
        self._finalizer = weakref.finalize(self, _stop, self.proc, self._ctx, self._dir)
        self.info: EngineCoreInfo | None = None  # set by wait_ready()

    def _run_in_thread(self, engine_kwargs: dict[str, Any], base: str) -> None:
        def keep(core: EngineCore) -> None:
            self.core = core

        run_engine_core(engine_kwargs, f"{base}/input", f"{base}/output", None, self._ctx, keep)

    def wait_ready(self) -> EngineCoreInfo:
        """Waits until the core has loaded the model (start it, do other start-up work, then
        call this); raises if it failed to start."""
        while True:
            if self.output_socket.poll(100):
                kind, message = self.receive()
                if kind is Kind.READY:
                    self.info = message
                    return message
                self.shutdown()
                raise RuntimeError(f"The engine core failed to start: {message}")
            if not self.alive:
                self.shutdown()
                raise RuntimeError(f"The engine core exited during start-up "
                                   f"({self.exit_description}); its log is above.")

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    @property
    def exit_description(self) -> str:
        if self.proc is None:
            return "its thread ended"
        code = self.proc.poll()
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def send(self, kind: Kind, message: Any) -> None:
        """Queues a message for the core; raises EngineDeadError if it is gone (a PUSH socket
        with no peer would wait for one forever)."""
        frames = self._encoder.encode(kind, message)
        while not self.input_socket.poll(1000, zmq.POLLOUT):
            if not self.alive:
                raise EngineDeadError(f"The engine core died ({self.exit_description}).")
        self.input_socket.send_multipart(frames, copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.send(Kind.ADD, request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.send(Kind.ABORT, request_ids)

    def receive(self) -> tuple[Kind, Any]:
        frames = self.output_socket.recv_multipart(copy=False)
        return self._decoder.decode([f.buffer for f in frames])

    def get_output(self) -> EngineCoreOutputs:
        """Blocks until the core's next step message (the core steps on its own)."""
        while True:
            kind, message = self._receive_or_die()
            if kind is Kind.OUTPUTS:
                return message

    def call_utility(self, method: str) -> Any:
        """Calls a core method between steps and waits for its result; step messages that
        arrive meanwhile are dropped, so use this only while no request is unfinished."""
        call = UtilityCall(next(self._call_ids), method)
        self.send(Kind.UTILITY, call)
        while True:
            kind, message = self._receive_or_die()
            if kind is Kind.RESULT and message.call_id == call.call_id:
                return utility_result(message)

    def _receive_or_die(self) -> tuple[Kind, Any]:
        while not self.output_socket.poll(1000):
            if not self.alive:
                raise EngineDeadError(f"The engine core died ({self.exit_description}).")
        kind, message = self.receive()
        if kind is Kind.FAILED:
            raise EngineDeadError(f"The engine core failed: {message}")
        return kind, message

    def shutdown(self, timeout: float = 5.0) -> None:
        """Asks the core to stop, then makes sure it has (SIGKILL after ``timeout``)."""
        if self.alive:
            try:
                self.send(Kind.SHUTDOWN, None)
            except (zmq.ZMQError, EngineDeadError):
                pass
        self._finalizer.detach()
        if self._thread is not None:
            self._thread.join(timeout)
        _stop(self.proc, self._ctx, self._dir, timeout)
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


def utility_result(result: UtilityResult) -> Any:
    if result.error is not None:
        raise RuntimeError(result.error)
    return result.result


def start_child(module: str, payload: dict[str, Any], args: list[str]) -> subprocess.Popen:
    """``python -m module args``, told this process's pid (``--parent-pid``: it exits when this
    one is gone) and log level, with ``payload`` as JSON on its stdin (the engine core, a
    tensor-parallel worker)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--parent-pid", str(os.getpid()),
         "--log-level", level], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(payload).encode())
    proc.stdin.close()
    return proc


def _stop(proc: subprocess.Popen | None, ctx: zmq.Context, folder: str | None,
          timeout: float | None = None) -> None:
    """Waits ``timeout`` seconds for the core to stop (None: the interpreter is exiting and
    nobody asked it to: SIGTERM first), then kills it."""
    if proc is not None:
        if timeout is None:
            proc.terminate()
        try:
            proc.wait(5.0 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            logger.warning("The engine core did not stop in time; killing it")
            proc.kill()
            proc.wait()
    ctx.destroy(linger=0)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _pidfd(pid: int) -> int | None:
    """A descriptor that polls readable once ``pid`` has exited (Linux >= 5.3), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
