"""All-reduce latency between the GPUs of one host: what a tensor-parallel decode step pays
per layer (two all-reduces of [batch, hidden] activations).

    torchrun --nproc-per-node 2 benchmarks/bench_allreduce.py

For each size: NCCL called eagerly from Python, 64 NCCL all-reduces replayed in one CUDA graph
(as a captured decode step runs them), and the same with torch's symmetric-memory one-shot
all-reduce (peer loads over NVLink) when this torch has it. Microseconds per all-reduce,
median of 20 replays; rank 0 prints.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

SIZES = [(1, 4096), (8, 4096), (64, 4096), (256, 4096), (1, 8192), (256, 8192)]
OPS_PER_GRAPH = 64


def median_us(fn, count: int) -> float:
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(times)


def graphed(op, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    for _ in range(3):
        op(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(OPS_PER_GRAPH):
            op(x)
    return graph


def symm_mem_op(numel: int, dtype: torch.dtype):
    """A one-shot all-reduce over a symmetric buffer, or None if this torch lacks it."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group)
        buf = symm_mem.empty(numel, dtype=dtype, device="cuda")
        symm_mem.rendezvous(buf, group)
        one_shot = torch.ops.symm_mem.one_shot_all_reduce
    except Exception as e:  # noqa: BLE001
        print(f"symmetric memory unavailable: {type(e).__name__}: {e}")
        return None

    def op(x: torch.Tensor) -> torch.Tensor:
        buf[:x.numel()].copy_(x.view(-1))
        return one_shot(buf[:x.numel()], "sum", group)

    return op


def main() -> None:
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    show = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    show(f"{'shape':<14} {'KiB':>8} {'eager NCCL':>11} {'graph NCCL':>11}  (us per all-reduce)",
         flush=True)
    inputs = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for shape in SIZES]
    for shape, x in zip(SIZES, inputs):
        eager = median_us(lambda: dist.all_reduce(x), 1)  # noqa: B023
        nccl_graph = median_us(graphed(dist.all_reduce, x).replay, OPS_PER_GRAPH)
        show(f"{str(shape):<14} {x.numel() * 2 / 1024:>8.0f} {eager:>11.1f} {nccl_graph:>11.1f}",
             flush=True)
    show("symmetric-memory one-shot all-reduce, in a CUDA graph (us):", flush=True)
    for shape, x in zip(SIZES, inputs):
        symm = symm_mem_op(x.numel(), x.dtype)
        if symm is None:
            break
        ref = x.clone()
        dist.all_reduce(ref)
        assert torch.allclose(symm(x).view(shape).float(), ref.float(), atol=0.05)
        show(f"{str(shape):<14} {median_us(graphed(symm, x).replay, OPS_PER_GRAPH):>8.1f}",
             flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
