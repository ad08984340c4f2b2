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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one program holds: a hidden row of 2048, or 16 heads of 128.
_TILE = 2048


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr,  # rows of num_cols, row r at (r // inner) * stride_xo + (r % inner) * stride_xi
    res_ptr,  # same layout with its own strides (read only when HAS_RESIDUAL)
    w_ptr,  # [num_cols]
    out_ptr, res_out_ptr,  # [num_rows, num_cols] contiguous
    num_rows, inner, stride_xo, stride_xi, stride_ro, stride_ri, eps,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
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


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dim: x is [T, N] or [T, heads, N] (strided views allowed).

    Returns a new contiguous tensor of the reference's dtype (``weight * normed.to(x.dtype)``).
    """
    return _launch(x, None, None, weight, eps)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), both new tensors; x and residual are left as they are.

    residual has x's shape and dtype; so has the new residual.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must have x's shape and dtype")
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _launch(x, residual, new_residual, weight, eps), new_residual


def _launch(x: torch.Tensor, residual: torch.Tensor | None, new_residual: torch.Tensor | None,
            weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Never synchronizes: the grid depends on the row count only."""
    num_cols = x.shape[-1]
    inner, stride_xo, stride_xi = _row_strides(x)
    res_strides = (0, 0) if residual is None else _row_strides(residual)[1:]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    num_rows = x.numel() // num_cols
    if num_rows:
        block_n = triton.next_power_of_2(num_cols)
        block_r = max(1, _TILE // block_n)
        _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            x, x if residual is None else residual, weight, out,
            out if new_residual is None else new_residual,
            num_rows, inner, stride_xo, stride_xi, *res_strides, eps,
            N=num_cols, BLOCK_N=block_n, BLOCK_R=block_r, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block_r * block_n // 256)),
        )
    return out
