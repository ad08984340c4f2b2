"""The fused-MoE Triton kernel against the per-expert cuBLAS path it replaces, one sparse layer.

    python benchmarks/bench_fused_moe.py

bf16 on one GPU. Shapes: Qwen3-30B-A3B (hidden 2048, expert width 768, 128 experts, top-8) and
Mixtral-8x7B (4096, 14336, 8 experts, top-2), at T tokens a step. The reference is
``layers.fused_moe.fused_experts_reference``: one cuBLAS matmul pair per expert that has tokens
(the grouped-GEMM reference). The floor is the bytes of the experts the step touches over the
measured copy bandwidth.
"""

from __future__ import annotations

import torch
import triton.testing

from pagedllm.kernels.fused_moe import fused_experts_triton
from pagedllm.layers.fused_moe import fused_experts_reference, route

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral-8x7b": (4096, 14336, 8, 2)}
TOKENS = [1, 16, 256, 2048]


def copy_bandwidth() -> float:
    a = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms / 1e3)


def main() -> None:
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'layer':<16}{'T':>6}{'experts':>9}{'fused us':>10}{'cuBLAS us':>11}{'floor us':>10}"
          f"{'fused/floor':>13}")
    for name, (hidden, inter, num_experts, top_k) in SHAPES.items():
        w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda")
        w2 = torch.randn(num_experts, hidden, inter, dtype=torch.bfloat16, device="cuda")
        w13.mul_(0.02)
        w2.mul_(0.02)
        for tokens in TOKENS:
            x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
            logits = torch.randn(tokens, num_experts, device="cuda")
            weights, ids = route(logits, top_k, renormalize=True)
            fused = triton.testing.do_bench(
                lambda: fused_experts_triton(x, w13, w2, weights, ids))  # noqa: B023
            ref = triton.testing.do_bench(
                lambda: fused_experts_reference(x, w13, w2, weights, ids))  # noqa: B023
            active = ids.unique().numel()
            floor_us = 1e6 * active * 3 * hidden * inter * 2 / bw
            print(f"{name:<16}{tokens:>6}{active:>9}{1e3 * fused:>10.1f}{1e3 * ref:>11.1f}"
                  f"{floor_us:>10.1f}{1e3 * fused / floor_us:>13.2f}")


if __name__ == "__main__":
    main()
