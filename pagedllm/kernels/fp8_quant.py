"""Triton kernel that quantizes each row of a matrix to FP8 (e4m3) with its own scale.

One program per row: it finds the row's absolute maximum, the scale is
``max(amax / 448, min_scale)``, and it stores ``fp8(clamp(x * (1 / scale)))``, the
arithmetic of ``layers.quantization.fp8.quantize_rows_ref`` (the reciprocal rounded to fp32 once,
then one IEEE product per element, so the stored bytes equal the reference's). Used for the
activations of ``--quantization fp8`` that no kernel before the product quantized (o_proj's
input; the RMSNorm and SiLU-and-mul kernels quantize in their epilogues with the same
``quantize_block``) and to quantize weights at load (one row per output channel). A row of up to
``ONE_PASS_COLS`` values is read once and kept in registers; a longer one is read twice, in
blocks. The grid depends only on the row count: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # columns per iteration of each pass (rows longer than ONE_PASS_COLS)
ONE_PASS_COLS = 16384  # up to this many columns a row is held whole: 64 values a thread


@triton.jit
def quantize_block(x, fp8_max, min_scale):
    """Each row of the fp32 block x [R, C] (padding 0) with its own scale: (the values to cast
    to FP8, clamped; the scales [R]). IEEE divisions (div_rn), as torch's: a plain fp32 '/' may
    be approximate on the GPU. Also the epilogue of the RMSNorm and SiLU-and-mul kernels when
    their output feeds an FP8 product."""
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 1), fp8_max), min_scale)
    inv = tl.math.div_rn(1.0, scale)
    return tl.minimum(tl.maximum(x * inv[:, None], -fp8_max), fp8_max), scale


@triton.jit
def _quantize_row_once(x_row, out_row, scale_out, num_cols, fp8_max, min_scale,
                       BLOCK: tl.constexpr):
    """A row of at most BLOCK values, read once and held in registers."""
    cols = tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_row + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
    q, scale = quantize_block(x, fp8_max, min_scale)
    tl.store(scale_out + tl.arange(0, 1), scale)
    tl.store(out_row + cols, q.to(out_row.dtype.element_ty), mask=cols < num_cols)


@triton.jit(do_not_specialize=["num_cols"])
def _quantize_rows_kernel(
    x_ptr,  # [num_rows, num_cols], last dim contiguous
    out_ptr,  # [num_rows, num_cols] float8e4nv, contiguous
    scale_ptr,  # [num_rows] fp32
    num_cols, stride_x, fp8_max, min_scale,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:  # BLOCK covers the row
        _quantize_row_once(x_row, out_ptr + row * num_cols, scale_ptr + row, num_cols, fp8_max,
                           min_scale, BLOCK)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), fp8_max), min_scale)
    tl.store(scale_ptr + row, scale)
    inv = tl.math.div_rn(1.0, scale)
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inv, -fp8_max), fp8_max)
        tl.store(out_ptr + row * num_cols + cols, q.to(out_ptr.dtype.element_ty),
                 mask=cols < num_cols)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype, last dim contiguous) -> (fp8 [M, K], fp32 scales [M, 1])."""
    from pagedllm.layers.quantization.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX

    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows takes [M, K] with contiguous rows, got {tuple(x.shape)}")
    num_rows, num_cols = x.shape
    out = torch.empty(num_rows, num_cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows:
        one_pass = num_cols <= ONE_PASS_COLS
        block = triton.next_power_of_2(num_cols) if one_pass else _BLOCK
        _quantize_rows_kernel[(num_rows,)](
            x, out, scale, num_cols, x.stride(0), FP8_MAX, _MIN_SCALE, BLOCK=block,
            ONE_PASS=one_pass, num_warps=min(16, max(1, block // 512)))
    return out, scale
