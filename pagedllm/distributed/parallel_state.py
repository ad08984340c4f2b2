"""This process's tensor-parallel group: its rank, the world size and the collectives.

One group per process, set once by ``init_tensor_parallel`` before the model is built (NCCL on
CUDA, gloo on the CPU; a second gloo group carries host-side agreements such as the KV cache
size). Layers read ``tp_rank()`` / ``tp_size()`` when they are built; with one rank (the
default, no torch.distributed at all) every collective is the identity.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    device_group: dist.ProcessGroup | None = None  # NCCL (CUDA) or gloo (CPU)
    cpu_group: dist.ProcessGroup | None = None  # gloo, for host-side values


_GROUP = TensorParallelGroup()
# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tp_group() -> TensorParallelGroup:
    return _GROUP


def tp_rank() -> int:
    return _GROUP.rank


def tp_size() -> int:
    return _GROUP.size


def init_tensor_parallel(rank: int, world_size: int, init_method: str,
                         device: torch.device, timeout_s: float = 600.0) -> None:
    """Joins the group of ``world_size`` ranks that meet at ``init_method`` (``tcp://host:port``
    or ``env://``, torchrun's variables). Rank r uses ``device`` (cuda:local rank, or the CPU)."""
    global _GROUP
    if world_size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks of one host share its cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" \
        else dist.group.WORLD
    _GROUP = TensorParallelGroup(rank, world_size, dist.group.WORLD, cpu_group)


def destroy_tensor_parallel() -> None:
    global _GROUP
    if _GROUP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = TensorParallelGroup()
# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over the ranks, in place."""
    if _GROUP.size > 1:
        dist.all_reduce(x, group=_GROUP.device_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., n * size], rank r's part at r * n."""
    if _GROUP.size == 1:
        return x
    out = torch.empty((_GROUP.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous(), group=_GROUP.device_group)
    parts = out.view(_GROUP.size, *x.shape).movedim(0, -2)  # [..., size, n]
    return parts.reshape(*x.shape[:-1], _GROUP.size * x.shape[-1])


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` of rank ``src`` into ``x`` of every rank, in place."""
    if _GROUP.size > 1:
        dist.broadcast(x, src, group=_GROUP.device_group)
    return x


def min_over_ranks(value: int) -> int:
    """The smallest of each rank's ``value`` (on the host, over gloo)."""
    if _GROUP.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUP.cpu_group)
    return int(t.item())
