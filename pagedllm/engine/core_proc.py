"""The engine core's own process: a busy loop of take requests, step, send one message a step.

Started by ``engine.core_client.MPClient`` as ``python -m pagedllm.engine.core_proc`` (a fresh
interpreter: no fork of a process holding threads or CUDA, no re-import of the user's script),
with the engine arguments as JSON on stdin. It connects to the front end's two ZeroMQ sockets:
requests, aborts and utility calls come in on one, ``engine.serial`` messages go out on the
other. It exits when told to, when the front end's process is gone, or if a step fails outside
any single request (then it says why before it goes).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import logging
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from pagedllm.engine.core import EngineCore
from pagedllm.engine.messages import UtilityCall, UtilityResult
from pagedllm.engine.serial import Decoder, Encoder, Kind

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000  # how often an idle core checks that its front end is still there
_UTILITIES = ("get_stats",)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_heap() -> None:
    """Gives the heap's free memory back to the system as the core goes idle. glibc keeps what
    a burst's steps freed (activations, per-request tensors) for reuse: ~100 MB of the default
    model's core after 48 prefills, measured. A few milliseconds, and only when idle."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class EngineCoreProc:
    def __init__(self, core: EngineCore, input_socket: zmq.Socket, output_socket: zmq.Socket,
                 parent_pid: int | None) -> None:
        self.core = core
        self.input, self.output = input_socket, output_socket
        self.parent_pid = parent_pid
        self.encoder, self.decoder = Encoder(), Decoder()

    def run(self) -> None:
        """Returns when told to shut down or when the front end's process is gone."""
        core, num_steps = self.core, 0
        while True:
            if not core.has_unfinished_requests():
                _trim_heap()
                while not self.input.poll(_IDLE_POLL_MS):
                    if self._orphaned():
                        return
            elif num_steps % 512 == 0 and self._orphaned():
                return
            aborted = self._take_inputs()
            if aborted is None:
                return
            if core.has_unfinished_requests():
                self._send(Kind.OUTPUTS, core.step())
                num_steps += 1
            elif aborted:  # no step will report the blocks the aborts freed
                self._send(Kind.OUTPUTS, core.state_message())

    def _take_inputs(self) -> bool | None:
        """Handles every message waiting; returns whether any aborted requests, None on
        shutdown."""
        aborted = False
        while True:
            try:
                frames = self.input.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return aborted
            kind, message = self.decoder.decode([f.buffer for f in frames])
            if kind is Kind.ADD:
                self.core.add_request(message)
            elif kind is Kind.ABORT:
                self.core.abort_requests(message)
                aborted = True
            elif kind is Kind.UTILITY:
                self._send(Kind.RESULT, self._call(message))
            elif kind is Kind.SHUTDOWN:
                return None

    def _call(self, call: UtilityCall) -> UtilityResult:
        if call.method not in _UTILITIES:
            return UtilityResult(call.call_id, error=f"no engine core utility {call.method!r}")
        try:
            return UtilityResult(call.call_id, getattr(self.core, call.method)())
        except Exception as e:
            logger.exception("Engine core utility %s failed", call.method)
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")

    def _send(self, kind: Kind, message: Any) -> None:
        self.output.send_multipart(self.encoder.encode(kind, message), copy=False)

    def _orphaned(self) -> bool:
        if self.parent_pid is None or os.getppid() == self.parent_pid:
            return False
        logger.error("The front end (pid %d) is gone; the engine core exits", self.parent_pid)
        return True


def run_engine_core(engine_kwargs: dict[str, Any], input_address: str, output_address: str,
                    parent_pid: int | None, ctx: zmq.Context | None = None,
                    on_ready: Callable[[EngineCore], None] | None = None) -> int:
    """Builds the core and serves it; returns the exit code. ``ctx``: the front end's ZeroMQ
    context when the core runs on a thread of its process (``inproc`` addresses)."""
    own_ctx = ctx is None
    ctx = zmq.Context() if ctx is None else ctx
    input_socket = ctx.socket(zmq.PULL)
    input_socket.connect(input_address)
    output_socket = ctx.socket(zmq.PUSH)
    output_socket.connect(output_address)
    encoder = Encoder()
    try:
        try:
            core = EngineCore.from_engine_args(**engine_kwargs)
        except BaseException as e:
            logger.exception("The engine core failed to start")
            output_socket.send_multipart(encoder.encode(Kind.FAILED, _describe(e)))
            return 1
        if on_ready is not None:
            on_ready(core)
        else:  # its own process: what start-up made lives as long as the core
            freeze_gc_heap()
        output_socket.send_multipart(encoder.encode(Kind.READY, core.info))
        proc = EngineCoreProc(core, input_socket, output_socket, parent_pid)
        try:
            proc.run()
        except SystemExit:
            raise
        except BaseException as e:
            logger.exception("The engine core failed")
            output_socket.send_multipart(encoder.encode(Kind.FAILED, _describe(e)))
            return 1
        return 0
    finally:
        # Messages still queued go out (outputs, a failure's reason) unless the peer is gone.
        input_socket.close(linger=0)
        output_socket.close(linger=2000)
        if own_ctx:
            ctx.term()


def freeze_gc_heap() -> None:
    """Moves every object alive now (the model's modules, the tokenizer, imported code) out of
    the garbage collector's sight: full collections then walk only what serving creates, and
    stop costing tens of milliseconds in the middle of a step."""
    gc.collect()
    gc.freeze()


def _describe(error: BaseException) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(error).__name__}: {error}{where}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True, help="ZeroMQ address of the request socket")
    parser.add_argument("--output", required=True, help="ZeroMQ address of the output socket")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level,
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    # Ctrl-C in a terminal reaches the whole process group: the front end decides when the core
    # stops (it drains requests first), so the core ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (a front end stopping at interpreter exit) exits through the interpreter's own
    # exit, so that the tensor-parallel workers are told to stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    kwargs = json.loads(sys.stdin.read())
    code = run_engine_core(kwargs, args.input, args.output, args.parent_pid)
    if os.getppid() != args.parent_pid and args.input.startswith("ipc://"):
        # The front end was killed before it could remove the sockets' folder.
        shutil.rmtree(os.path.dirname(args.input.removeprefix("ipc://")), ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
