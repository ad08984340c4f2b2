"""The weight-only FP8 product's tiles, swept on the GPU (issue 16): which tiling reads an FP8
weight nearest the memory bandwidth at decode sizes.

    python3 benchmarks/bench_fp8_gemm.py [--rows 1 16] [--shapes 8b|all]

For each linear layer shape of the Llama-3.1-8B model (and the Qwen3-0.6B one with ``all``) and
row count, every tiling of the sweep is timed in a CUDA graph (the engine captures decode steps),
next to cuBLAS's bf16 product of the same shape and ``torch._scaled_mm``'s FP8 one; each figure
is the effective bandwidth, the weight's bytes over the time. The heuristic's choice
(``choose_tiles``) is shown beside the best. A table comes last.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagedllm.kernels.fp8_gemm import Tiles, choose_tiles, fp8_weight_gemm_triton  # noqa: E402

SHAPES = {  # (N, K) of one rank's linear layers
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
           "down": (4096, 14336)},
    "0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
             "down": (1024, 3072)},
}
SWEEP = {  # the MMA kernel (any rows), the GEMV kernel (one row)
    False: dict(block_n=(32, 64), block_k=(128, 256), split_k=(1, 2, 4), num_warps=(4,),
                num_stages=(3, 5)),
    True: dict(block_n=(2, 4, 8, 16), block_k=(1024, 2048, 4096), split_k=(1, 2),
               num_warps=(4, 8), num_stages=(2, 3)),
}
SMEM_BYTES = 227 * 1024  # per block on sm90


def graph_us(fn) -> float:  # noqa: ANN001
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=25)


def fits(t: Tiles, k: int, gemv: bool) -> bool:
    if k < t.split_k * t.block_k:
        return False
    if gemv:  # at most 64 fp32 partial sums a thread
        return t.block_n * t.block_k <= 64 * 32 * t.num_warps
    stage = t.block_n * t.block_k + 16 * t.block_k * 2  # fp8 weight + bf16 activations
    return stage * t.num_stages <= SMEM_BYTES


def sweep(n: int, k: int, rows: int, gemv: bool) -> list[tuple[float, Tiles]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.1).to(torch.float8_e4m3fn)
    scale = torch.rand(1, n, device="cuda", generator=gen) + 0.5
    results = []
    for values in itertools.product(*SWEEP[gemv].values()):
        t = Tiles(*values)
        if not fits(t, k, gemv):
            continue
        try:
            results.append((graph_us(lambda t=t: fp8_weight_gemm_triton(
                x, w, scale, None, t, gemv=gemv)), t))
        except Exception as e:  # noqa: BLE001 - a tiling the compiler refuses
            print(f"  {t}: {type(e).__name__}", file=sys.stderr)
    results.sort()
    return results


def references(n: int, k: int, rows: int) -> tuple[float, float, float]:
    """(cuBLAS bf16 us, _scaled_mm fp8 us, the default tiles' us)."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w8 = wb.to(torch.float8_e4m3fn)
    xq = x.to(torch.float8_e4m3fn)
    sa = torch.ones(rows, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    bf16 = graph_us(lambda: x @ wb.t())
    scaled = graph_us(lambda: torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=sb,
                                               out_dtype=torch.bfloat16))
    chosen = graph_us(lambda: fp8_weight_gemm_triton(x, w8, sb, None))
    return bf16, scaled, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--shapes", choices=["8b", "all"], default="all")
    parser.add_argument("--gemv-only", action="store_true", help="one row, the GEMV kernel")
    args = parser.parse_args()
    models = ["8b"] if args.shapes == "8b" else list(SHAPES)
    table = []
    for model, rows, gemv in itertools.product(models, args.rows, (True, False)):
        if (gemv and rows > 1) or (args.gemv_only and not gemv):
            continue
        for layer, (n, k) in SHAPES[model].items():
            gb = n * k / 1e9
            best = sweep(n, k, rows, gemv)
            bf16, scaled, chosen = references(n, k, rows)
            top = ", ".join(f"{us:.1f}us {tuple(t)}" for us, t in best[:4])
            kernel = "gemv" if gemv else "mma"
            print(f"{model} {layer} N={n} K={k} M={rows} {kernel}: top {top}", flush=True)
            table.append((f"{model} {layer} {kernel}", n, k, rows, gb / best[0][0] * 1e6,
                          tuple(best[0][1]), gb / chosen * 1e6,
                          tuple(choose_tiles(n, k, rows == 1)), 2 * gb / bf16 * 1e6,
                          gb / scaled * 1e6))
    print("\nGB/s of weight read (fp8: 1 B, bf16: 2 B per weight), CUDA graphs")
    print(f"{'layer':<19}{'N':>6}{'K':>6}{'M':>4}{'best':>7}  {'best tiles':<24}{'chosen':>7}"
          f"  {'chosen tiles':<24}{'bf16':>7}{'_scaled':>8}")
    for name, n, k, m, b, bt, c, ct, bf, sc in table:
        print(f"{name:<19}{n:>6}{k:>6}{m:>4}{b:>7.0f}  {str(bt):<24}{c:>7.0f}  {str(ct):<24}"
              f"{bf:>7.0f}{sc:>8.0f}")


if __name__ == "__main__":
    main()
