"""The FP8 epilogue kernels compile for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter, which runs the other kernel tests on the CPU, accepts code its compiler
refuses (a loop-carried variable changing shape across a constexpr branch did, once). The
compiler needs no GPU, but it must run in a process where ``TRITON_INTERPRET`` is unset (the
kernels are then ``JITFunction``s): hence the subprocess. Skipped where this Triton has no
CUDA backend or toolchain.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagedllm.kernels import activation, fp8_quant, rms_norm

try:
    target = GPUTarget("cuda", 90, 32)
except Exception as err:  # noqa: BLE001
    print("SKIP", err); sys.exit(0)
NORM = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "res_out_ptr": "*bf16",
        "scale_ptr": "*fp32", "num_rows": "i32", "inner": "i32", "stride_xo": "i32",
        "stride_xi": "i32", "stride_ro": "i32", "stride_ri": "i32", "eps": "fp32",
        "fp8_max": "fp32", "min_scale": "fp32"}
CASES = [
    (fp8_quant._quantize_rows_kernel,
     {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "num_cols": "i32",
      "stride_x": "i32", "fp8_max": "fp32", "min_scale": "fp32"},
     [{"BLOCK": 4096, "ONE_PASS": True}, {"BLOCK": 1024, "ONE_PASS": False}]),
    (rms_norm._rms_norm_kernel, {**NORM, "out_ptr": "*fp8e4nv"},
     [{"N": 4096, "BLOCK_N": 4096, "BLOCK_R": 1, "HAS_RESIDUAL": r, "FP8_OUT": True}
      for r in (True, False)] + [{"N": 1024, "BLOCK_N": 1024, "BLOCK_R": 2,
                                  "HAS_RESIDUAL": True, "FP8_OUT": True}]),
    (rms_norm._rms_norm_kernel, {**NORM, "out_ptr": "*bf16"},
     [{"N": 4096, "BLOCK_N": 4096, "BLOCK_R": 1, "HAS_RESIDUAL": True, "FP8_OUT": False}]),
    (activation._silu_and_mul_kernel,
     {"x_ptr": "*bf16", "scale_ptr": "*fp32", "stride_xt": "i32", "fp8_max": "fp32",
      "min_scale": "fp32", "out_ptr": "*fp8e4nv"},
     [{"INTER": 14336, "BLOCK": 16384, "FP8_OUT": True}]),
    (activation._silu_and_mul_kernel,
     {"x_ptr": "*bf16", "scale_ptr": "*fp32", "stride_xt": "i32", "fp8_max": "fp32",
      "min_scale": "fp32", "out_ptr": "*bf16"},
     [{"INTER": 14336, "BLOCK": 1024, "FP8_OUT": False}]),
]
for kernel, signature, variants in CASES:
    for constexprs in variants:
        sig = {**signature, **{name: "constexpr" for name in constexprs}}
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                           target=target)
        except (FileNotFoundError, PermissionError) as err:  # no ptxas here
            print("SKIP", err); sys.exit(0)
        print("compiled", kernel.fn.__name__, constexprs)
'''


def test_fp8_epilogue_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 8, proc.stdout
