"""FP8 products at serving sizes on the GPU (issue 16): where ``--quantization fp8`` gains on bf16.

    python3 benchmarks/bench_fp8_mm.py [--rows 32 64 ...]

For each linear layer of the Llama-3.1-8B shape and each row count a serving step multiplies
(decodes of up to 256 requests, and prompt chunks beside them), the time in a CUDA graph of:
cuBLAS's bf16 product; ``torch._scaled_mm`` with a scale per token and per channel (what
``fp8_linear`` runs) on rows already in FP8 (what the fused RMSNorm / SiLU-and-mul epilogues
hand it), and with the row quantizer before it (the unfused path); and ``_scaled_mm`` with one
scale per tensor (cuBLASLt's own FP8 kernels, which per-token scales cannot use). Microseconds,
and the FP8 path's speed-up over bf16; a table per shape.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagedllm.kernels.fp8_quant import quantize_rows_triton  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def graph_us(fn) -> float:  # noqa: ANN001
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=25)


def times(n: int, k: int, rows: int) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
    wq, w_scale = quantize_rows_triton(w)
    w_scale = w_scale.reshape(1, -1)
    xq, x_scale = quantize_rows_triton(x)
    one = torch.ones((), device="cuda")

    def rowwise(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(a, wq.t(), scale_a=s, scale_b=w_scale, out_dtype=torch.bfloat16)

    return {
        "bf16": graph_us(lambda: torch.mm(x, w.t())),
        "fp8 rows in": graph_us(lambda: rowwise(xq, x_scale)),
        "quantize+fp8": graph_us(lambda: rowwise(*quantize_rows_triton(x))),
        "per-tensor": graph_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                        out_dtype=torch.bfloat16)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+",
                        default=[32, 64, 128, 256, 384, 512, 1024, 2048])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: us per product in a CUDA graph")
    for name, (n, k) in SHAPES.items():
        print(f"\n{name} {n} x {k}")
        print(f"{'rows':>6} {'bf16':>8} {'fp8 rows in':>12} {'quantize+fp8':>13} "
              f"{'per-tensor':>11} {'bf16/fused':>11} {'bf16/unfused':>13}")
        for rows in args.rows:
            t = times(n, k, rows)
            print(f"{rows:>6} {t['bf16']:>8.1f} {t['fp8 rows in']:>12.1f} "
                  f"{t['quantize+fp8']:>13.1f} {t['per-tensor']:>11.1f} "
                  f"{t['bf16'] / t['fp8 rows in']:>10.2f}x "
                  f"{t['bf16'] / t['quantize+fp8']:>12.2f}x")


if __name__ == "__main__":
    main()
