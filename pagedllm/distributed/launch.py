"""Where each tensor-parallel rank runs: the processes pagedllm starts on one host, or the ones
``torchrun`` started on several (rank, world size and master address in the environment).

Under torchrun every process runs the same command. Rank 0 becomes the engine (its core joins
the group as rank 0); every other rank becomes a worker (``become_worker_if_torchrun``) that
serves rank 0's steps and exits when rank 0 stops.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.config import DeviceConfig


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str


def torchrun_env() -> TorchrunEnv | None:
    """The torchrun (or any ``env://``) launch this process is part of, if any."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
        return None
    return TorchrunEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                       int(env.get("LOCAL_RANK", env["RANK"])), env["MASTER_ADDR"])


def tensor_parallel_size(engine_kwargs: dict[str, Any]) -> int:
    return engine_kwargs.get("tensor_parallel_size") or 1


def become_worker_if_torchrun(engine_kwargs: dict[str, Any]) -> None:
    """On a torchrun rank other than 0: serves as that rank's worker, then exits the process
    (the rest of the caller's program runs on rank 0 only)."""
    env = torchrun_env()
    if env is None or env.rank == 0 or tensor_parallel_size(engine_kwargs) == 1:
        return
    from pagedllm.worker.worker_proc import run_worker

    sys.exit(run_worker(engine_kwargs, env.rank, env.world_size, env.local_rank, "env://",
                        parent_pid=None))


def uses_cuda(engine_kwargs: dict[str, Any]) -> bool:
    return DeviceConfig(engine_kwargs.get("device") or "auto").resolved() == "cuda"


def rank_device(engine_kwargs: dict[str, Any], local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if uses_cuda(engine_kwargs) else torch.device("cpu")


def check_devices(engine_kwargs: dict[str, Any], world_size: int) -> None:
    """One GPU per rank on this host."""
    if uses_cuda(engine_kwargs) and world_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size ({world_size}) is larger than the number of "
                         f"GPUs on this host ({torch.cuda.device_count()}); to use GPUs of "
                         "several hosts, start the ranks with torchrun (see the README)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
