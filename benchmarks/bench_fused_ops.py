"""Fused Triton kernels vs the torch layer code they replace, op by op, on one GPU.

    python benchmarks/bench_fused_ops.py

Shapes of Llama-3.2-1B (hidden 2048, 32 q / 8 kv heads, head_dim 64, intermediate 8192), bf16,
at batch 1 and 256 tokens. Each op is timed inside a CUDA graph, as decode runs it, so batch 1
shows the in-graph cost of the launches that fusion removes. A layer runs each op once, the
add + norm twice; the last lines sum one layer and the 16 layers of a decode step. Takes a few
seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import triton
import triton.testing

from pagedllm.layers import dispatch
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding, apply_rotary

HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTER, NUM_LAYERS = 2048, 32, 8, 64, 8192, 16
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
BATCHES = [1, 256]
Output = torch.Tensor | tuple[torch.Tensor, ...]
PER_LAYER = {"rms_norm": 0, "add + rms_norm": 2, "rotary q, k": 1, "silu_and_mul": 1}


@contextmanager
def layer_path(fused: bool) -> Iterator[None]:
    """Runs the layers' Triton kernels (fused) or their torch code, on the same CUDA tensors."""
    saved = dispatch.use_triton
    dispatch.use_triton = lambda x: fused
    try:
        yield
    finally:
        dispatch.use_triton = saved


def make_ops(batch: int) -> dict[str, tuple[Callable[[], Output], int]]:
    """name -> (the layer call, bytes it must read and write)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEV, dtype=DTYPE)

    x, residual = randn(batch, HIDDEN), randn(batch, HIDDEN)
    norm = RMSNorm(HIDDEN, 1e-5).to(DEV, DTYPE)
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    q, k, _ = randn(batch, q_size + 2 * kv_size).split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(batch, NUM_HEADS, HEAD_DIM), k.view(batch, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 8192, (batch,), device=DEV)
    cos_sin = RotaryEmbedding(HEAD_DIM, 8192, 500000.0).to(DEV)(positions, DTYPE)
    gate_up, act = randn(batch, 2 * INTER), SiluAndMul()
    e = DTYPE.itemsize
    return {
        "rms_norm": (lambda: norm(x), 2 * batch * HIDDEN * e),
        "add + rms_norm": (lambda: norm(x, residual), 4 * batch * HIDDEN * e),
        "rotary q, k": (lambda: apply_rotary(q, k, cos_sin),
                        2 * batch * (q_size + kv_size + HEAD_DIM) * e),
        "silu_and_mul": (lambda: act(gate_up), 3 * batch * INTER * e),
    }


def max_error(fused: Output, ref: Output) -> float:
    pairs = zip(fused, ref) if isinstance(fused, tuple) else [(fused, ref)]
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


def graph_time_us(fn: Callable[[], Output]) -> float:
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_ops.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("Llama-3.2-1B shapes, bf16, CUDA graphs; GB/s = bytes the op must move / fused time")
    print(f"{'batch':>5} {'op':<15} {'torch us':>9} {'fused us':>9} {'speedup':>7} "
          f"{'GB/s':>6} {'max|err|':>9}")
    for batch in BATCHES:
        layer = {False: 0.0, True: 0.0}
        for name, (fn, nbytes) in make_ops(batch).items():
            times, outs = {}, {}
            for fused in (False, True):
                with layer_path(fused):
                    outs[fused] = fn()
                    times[fused] = graph_time_us(fn)
                layer[fused] += PER_LAYER[name] * times[fused]
            print(f"{batch:>5} {name:<15} {times[False]:>9.2f} {times[True]:>9.2f} "
                  f"{times[False] / times[True]:>6.1f}x {nbytes / times[True] / 1e3:>6.0f} "
                  f"{max_error(outs[True], outs[False]):>9.2e}")
        print(f"{batch:>5} {'one layer':<15} {layer[False]:>9.2f} {layer[True]:>9.2f} "
              f"{layer[False] / layer[True]:>6.1f}x")
        print(f"{batch:>5} {f'{NUM_LAYERS} layers':<15} {NUM_LAYERS * layer[False]:>9.1f} "
              f"{NUM_LAYERS * layer[True]:>9.1f}")


if __name__ == "__main__":
    main()
