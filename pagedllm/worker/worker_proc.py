"""A tensor-parallel worker: one rank other than 0, serving the engine core's steps.

Started by ``engine.executor.WorkerGroup`` as ``python -m pagedllm.worker.worker_proc`` (its
rank and the engine arguments as JSON on stdin), or by torchrun on another host
(``distributed.launch``). It joins the group, builds its shard of the model and its KV cache
exactly as rank 0 does (the collectives of loading, profiling and CUDA-graph capture pair up),
then launches every step rank 0 publishes: the same inputs, its own heads, the same collectives.
It never samples; rank 0's sampled ids reach it on the device. It exits when told to, when
its parent is gone, or when a step fails (rank 0's watchdog then stops the engine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

import torch.distributed as dist
import zmq

from pagedllm.distributed.launch import rank_device
from pagedllm.distributed.parallel_state import init_tensor_parallel, tp_group
from pagedllm.engine.serial import Decoder, Kind

logger = logging.getLogger(__name__)

_POLL_MS = 1000  # how often an idle worker checks that its parent is still there


def run_worker(engine_kwargs: dict[str, Any], rank: int, world_size: int, local_rank: int,
               init_method: str, parent_pid: int | None) -> int:
    """Builds rank ``rank``'s runner and serves steps until told to stop; the exit code."""
    from pagedllm.engine.builder import build_runner

    init_tensor_parallel(rank, world_size, init_method, rank_device(engine_kwargs, local_rank))
    runner, _ = build_runner(engine_kwargs)
    address = [None]
    dist.broadcast_object_list(address, src=0, group=tp_group().cpu_group)
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(address[0])
    decoder = Decoder()
    while True:
        if not socket.poll(_POLL_MS):
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("Rank %d: the engine core is gone; exiting", rank)
                return 1
            continue
        frames = socket.recv_multipart(copy=False)
        kind, step = decoder.decode([f.buffer for f in frames])
        assert kind is Kind.STEP
        if step.sched is None:
            return 0
        for request_id in step.freed:
            runner.free_request(request_id)
        runner.launch(step.sched)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    spec = json.loads(sys.stdin.read())
    # Rank 0 logs the start-up; the workers say only what goes wrong.
    logging.basicConfig(level=max(logging.WARNING, logging.getLevelName(args.log_level)),
                        format=f"%(levelname)s %(asctime)s rank {spec['rank']} %(name)s: "
                               "%(message)s", datefmt="%m-%d %H:%M:%S")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when to stop
    try:
        return run_worker(spec["engine_kwargs"], spec["rank"], spec["world_size"],
                          spec["local_rank"], spec["init_method"], args.parent_pid)
    except Exception:
        logger.exception("Tensor-parallel worker of rank %d failed", spec["rank"])
        return 1


if __name__ == "__main__":
    sys.exit(main())
