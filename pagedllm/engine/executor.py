"""Executors: how the engine core runs its steps on one rank or on several.

``UniProcExecutor`` holds the one model runner. ``MultiprocExecutor`` (tensor parallelism) holds
rank 0's runner in the core's process and feeds every other rank's worker
(``worker.worker_proc``) each step: the scheduler's decision is encoded once and published on
one ZeroMQ socket that all workers read, then every rank prepares the same inputs and runs its
shard; sampling happens on rank 0, which broadcasts the sampled ids on the device.

Workers are started here, one process per rank on this host (rank r on ``cuda:r``), or by
``torchrun`` on several hosts (``distributed.launch``): then this process is rank 0 and the
others find it through the process group. A worker that dies takes the engine down: the core's
process exits (the front end reports the engine dead) rather than wait on a collective forever.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any, TypeVar

import torch.distributed as dist
import zmq

from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.distributed import launch
from pagedllm.distributed.parallel_state import init_tensor_parallel, tp_group
from pagedllm.engine.core_client import start_child
from pagedllm.engine.serial import Encoder, Kind, StepMessage
from pagedllm.structured_output.bitmask import StepBitmask
from pagedllm.worker.model_runner import LaunchedStep, ModelRunner

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The workers built their shards with rank 0 (collectives pair them): they connect at once.
_SUBSCRIBE_TIMEOUT_S = 120


class UniProcExecutor:
    """Steps run on the runner of this process."""

    # Whether a step that fails to launch may be retried request by request (EngineCore).
    retry_failed_steps = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def launch(self, sched: SchedulerOutput,
               token_masks: Callable[[], StepBitmask | None] | None = None) -> LaunchedStep:
        """``token_masks``: ``ModelRunner.launch``'s (rank 0 samples, so only it needs them)."""
        return self.runner.launch(sched, token_masks)

    def free_request(self, request_id: str) -> None:
        self.runner.free_request(request_id)


class MultiprocExecutor(UniProcExecutor):
    """Rank 0's runner here; the other ranks' workers read each step from ``publisher``."""

    # Ranks that disagree on which steps ran would wait on each other's collectives: a failed
    # launch ends the engine instead.
    retry_failed_steps = False

    def __init__(self, runner: ModelRunner, publisher: zmq.Socket,
                 workers: WorkerGroup | None, folder: str | None) -> None:
        super().__init__(runner)
        self.publisher, self.workers, self.folder = publisher, workers, folder
        self.encoder = Encoder()
        self._freed: list[str] = []  # told to the workers with the next step
        atexit.register(self.shutdown)

    def launch(self, sched: SchedulerOutput,
               token_masks: Callable[[], StepBitmask | None] | None = None) -> LaunchedStep:
        self._publish(StepMessage(self._freed, sched))
        self._freed = []
        return self.runner.launch(sched, token_masks)

    def free_request(self, request_id: str) -> None:
        super().free_request(request_id)
        self._freed.append(request_id)

    def _publish(self, message: StepMessage) -> None:
        self.publisher.send_multipart(self.encoder.encode(Kind.STEP, message), copy=False)

    def shutdown(self) -> None:
        """Tells the workers to exit and waits for them (idempotent)."""
        atexit.unregister(self.shutdown)
        if self.publisher.closed:
            return
        if self.workers is not None:
            self.workers.stopping.set()
        self._publish(StepMessage([], None))
        if self.workers is not None:
            self.workers.wait()
        self.publisher.close(linger=1000)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class WorkerGroup:
    """The worker processes of ranks 1..N-1 on this host, watched by a thread that ends this
    process when one exits before being told to: the ranks left would wait on it in their next
    collective forever."""

    def __init__(self, engine_kwargs: dict[str, Any], world: int, init_method: str) -> None:
        self.stopping = threading.Event()
        self.procs = [start_child("pagedllm.worker.worker_proc",
                                  {"engine_kwargs": engine_kwargs, "rank": rank,
                                   "world_size": world, "local_rank": rank,
                                   "init_method": init_method}, [])
                      for rank in range(1, world)]
        threading.Thread(target=self._watch, name="pagedllm-tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        fds = {os.pidfd_open(p.pid): p for p in self.procs}
        dead = fds[wait(list(fds))[0]]
        code = dead.wait()
        if self.stopping.is_set():
            return
        logger.error("Tensor-parallel worker (pid %d) exited with code %s; the engine core "
                     "stops", dead.pid, code)
        self.kill()
        logging.shutdown()
        os._exit(1)

    def wait(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def start_workers(engine_kwargs: dict[str, Any],
                  build_runner: Callable[[dict[str, Any]], tuple[ModelRunner, T]],
                  ) -> tuple[MultiprocExecutor, T]:
    """Starts the other ranks (unless torchrun did), joins the group as rank 0 and builds this
    rank's runner with ``build_runner`` (which returns it with anything else it made)."""
    world = launch.tensor_parallel_size(engine_kwargs)
    env = launch.torchrun_env()
    folder, workers = None, None
    if env is not None:
        if env.world_size != world:
            raise ValueError(f"torchrun started {env.world_size} processes but "
                             f"tensor_parallel_size is {world}")
        init_method, local_rank = "env://", env.local_rank
    else:
        launch.check_devices(engine_kwargs, world)
        init_method, local_rank = f"tcp://127.0.0.1:{launch.free_port()}", 0
        workers = WorkerGroup(engine_kwargs, world, init_method)
    try:
        init_tensor_parallel(0, world, init_method, launch.rank_device(engine_kwargs, local_rank))
        runner, extra = build_runner(engine_kwargs)
        publisher = zmq.Context.instance().socket(zmq.XPUB)
        publisher.setsockopt(zmq.SNDHWM, 0)  # never drop a step
        publisher.setsockopt(zmq.XPUB_VERBOSE, 1)  # every worker's subscription, not the first
        if env is None:
            folder = tempfile.mkdtemp(prefix="pagedllm-tp-")
            address = f"ipc://{folder}/steps"
            publisher.bind(address)
        else:
            port = publisher.bind_to_random_port("tcp://*")
            address = f"tcp://{env.master_addr}:{port}"
        dist.broadcast_object_list([address], src=0, group=tp_group().cpu_group)
        for _ in range(world - 1):  # each worker's subscription: none misses the first step
            if not publisher.poll(_SUBSCRIBE_TIMEOUT_S * 1000):
                raise RuntimeError(f"tensor-parallel workers did not connect to {address} "
                                   f"within {_SUBSCRIBE_TIMEOUT_S} s")
            publisher.recv()
    except BaseException:
        if workers is not None:
            workers.stopping.set()
            workers.kill()
        raise
    logger.info("Tensor parallel over %d ranks (%s); steps published on %s", world,
                dist.get_backend(), address)
    return MultiprocExecutor(runner, publisher, workers, folder), extra
