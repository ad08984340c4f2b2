"""Triton RMSNorm over rows, optionally fused with the residual add that precedes it.

One launch replaces the reference's chain of fp32 elementwise kernels (upcast, square, mean,
rsqrt, scale, downcast, weight). The rounding follows ``layers.norm.RMSNorm`` step by step, so
the results differ from it only by the order of the fp32 sum: ``residual = x + residual`` is
rounded to the input dtype (as torch's add is) and the normalized row is rounded to the input
dtype before it is multiplied by the weight.

Rows are addressed as ``(outer, inner)`` pairs with a stride each, so q or k heads that are
strided views of the fused qkv projection ([T, heads, head_dim]) are normalized in place of a
copy. Each program takes ``BLOCK_R`` rows of at most ``BLOCK_N`` columns: a whole hidden row for
the layer norms, a tile of heads for q/k norm. The grid depends only on the row count, so the
launch can be captured in a CUDA graph.

Before an FP8 product (``--quantization fp8``), the normalized rows are quantized per token in
the same program (``fp8_quant.quantize_block``): the weighted row, rounded to the model dtype
as the plain output is, is stored in FP8 with its scale, the bytes ``quantize_rows`` would
store from the plain output, without its launch and its pass over the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.fp8_quant import quantize_block
from pagedllm.layers.quantization.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX, Fp8Rows

# Elements one program holds: a hidden row of 2048, or 16 heads of 128.
_TILE = 2048


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr,  # rows of num_cols, row r at (r // inner) * stride_xo + (r % inner) * stride_xi
    res_ptr,  # same layout with its own strides (read only when HAS_RESIDUAL)
    w_ptr,  # [num_cols]
    out_ptr, res_out_ptr,  # [num_rows, num_cols] contiguous
    scale_ptr,  # [num_rows] fp32, written when FP8_OUT (out_ptr is then float8e4nv)
    num_rows, inner, stride_xo, stride_xi, stride_ro, stride_ri, eps, fp8_max, min_scale,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    outer, sub = rows // inner, rows % inner
    x_off = (outer * stride_xo + sub * stride_xi)[:, None] + cols[None, :]
    out_off = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
    if HAS_RESIDUAL:
        r_off = (outer * stride_ro + sub * stride_ri)[:, None] + cols[None, :]
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(x_ptr.dtype.element_ty)  # rounded as the reference's add
        tl.store(res_out_ptr + out_off, x.to(res_out_ptr.dtype.element_ty), mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # [BLOCK_R]; padding adds 0
    y = (x * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if FP8_OUT:
        y = (y * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        q, scale = quantize_block(y, fp8_max, min_scale)
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)
        tl.store(out_ptr + out_off, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_off, (y * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(inner, stride_outer, stride_inner) of x's rows: up to two leading dims, last contiguous."""
    if x.stride(-1) != 1:
        raise ValueError("rms_norm needs a contiguous last dimension")
    if x.dim() == 2:
        return 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[1], x.stride(0), x.stride(1)
    raise ValueError(f"rms_norm takes [rows, N] or [T, heads, N], got shape {tuple(x.shape)}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """RMSNorm of x's last dim: x is [T, N] or [T, heads, N] (strided views allowed).

    Returns a new contiguous tensor of the reference's dtype (``weight * normed.to(x.dtype)``),
    or with ``fp8`` ([T, N] only) its rows quantized per token.
    """
    return _launch(x, None, None, weight, eps, fp8)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float, fp8: bool = False,
                        ) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """(norm(x + residual), x + residual), both new; x and residual are left as they are.

    residual has x's shape and dtype; so has the new residual. ``fp8``: as ``rms_norm_triton``.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must have x's shape and dtype")
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _launch(x, residual, new_residual, weight, eps, fp8), new_residual


def _launch(x: torch.Tensor, residual: torch.Tensor | None, new_residual: torch.Tensor | None,
            weight: torch.Tensor, eps: float, fp8: bool) -> torch.Tensor | Fp8Rows:
    """Never synchronizes: the grid depends on the row count only."""
    num_cols = x.shape[-1]
    inner, stride_xo, stride_xi = _row_strides(x)
    res_strides = (0, 0) if residual is None else _row_strides(residual)[1:]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if fp8 and (x.dim() != 2 or dtype != x.dtype):
        raise ValueError("an FP8 output takes [T, N] rows and a weight of their dtype")
    out = torch.empty(x.shape, dtype=FP8_DTYPE if fp8 else dtype, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device) if fp8 else out
    num_rows = x.numel() // num_cols
    if num_rows:
        block_n = triton.next_power_of_2(num_cols)
        block_r = max(1, _TILE // block_n)
        _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            x, x if residual is None else residual, weight, out,
            out if new_residual is None else new_residual, scale,
            num_rows, inner, stride_xo, stride_xi, *res_strides, eps, FP8_MAX, _MIN_SCALE,
            N=num_cols, BLOCK_N=block_n, BLOCK_R=block_r, HAS_RESIDUAL=residual is not None,
            FP8_OUT=fp8, num_warps=min(16, max(1, block_r * block_n // 256)),
        )
    return Fp8Rows(out, scale, dtype) if fp8 else out
