"""Triton product of a few rows of activations with an FP8 weight: the decode step's linears.

A decode step multiplies a handful of tokens by every weight, so it is bound by reading the
weight; FP8 halves those bytes. cuBLAS's FP8 products need the activations in FP8 too (one more
kernel per linear to quantize them) and are tuned for large M. Here the activations stay in
their dtype and each weight tile is upcast in registers (exact: e4m3 fits in bf16 and fp16):
``out = (x @ fp8(W)^T) * w_scale + bias``, the weight-only ("W8A16") form.

Two kernels. One row (a batch-1 decode) takes ``_fp8_weight_gemv_kernel``: each program owns
``BLOCK_N`` output channels (2 to 8, fewer for bigger matrices) and walks the inner dimension
``BLOCK_K`` (1024 or 2048) bytes of each at a time, multiplying in fp32 registers; each thread
keeps its own partial sums and the threads reduce once at the end, so the loop is loads and
FMAs only. Two to 16 rows take ``_fp8_weight_gemm_kernel``: ``tl.dot`` of the activations
``[16, BLOCK_K]`` with the upcast weight tile ``[BLOCK_K, BLOCK_N]`` (32 x 128), fp32
accumulators. Either may split the inner
dimension into ``SPLIT_K`` slices (the MMA kernel does for narrow layers, to give every SM
enough programs), whose fp32 partials ``_sum_splits_kernel`` then sums, scales, biases and
rounds (without a split the main kernel does that). The tiles are the best of a sweep on an H200
(``benchmarks/bench_fp8_gemm.py``, the 8B and 0.6B shapes): the GEMV reads 3.0-3.4 TB/s of
FP8 weight on the 8B layers, the MMA kernel at 16 rows 1.8-2.7 TB/s, against 1.6-2.8 TB/s for
the first, untuned MMA tiling at one row. The grid depends on the weight's shape only, so a
launch can be captured in a CUDA graph for its row count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # BLOCK_M: rows per launch


class Tiles(NamedTuple):
    """A launch's tiling: channels and inner-dimension width per program, slices of K, and the
    warps and pipeline stages of each program."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _store(acc, rows, cols, num_rows, N, pid_k, scale_ptr, bias_ptr, out_ptr,
           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [rows, cols] fp32 times the channels' scales: the output (plus bias) without a
    split, else this slice's fp32 partial sums."""
    row_ok, col_ok = rows < num_rows, cols < N
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        part = (pid_k * num_rows + rows[:, None]) * N + cols[None, :]
        tl.store(out_ptr + part, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_weight_gemm_kernel(
    x_ptr,  # [num_rows, K], last dim contiguous
    w_ptr,  # [N, K] float8e4nv, row-major
    scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [num_rows, N] in x's dtype, or fp32 partials [SPLIT_K, num_rows, N]
    num_rows, N, K, stride_x, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < num_rows, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for start in range(k_lo, k_hi, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = (ks < k_hi) | EVEN_K  # a constant mask along K keeps the loads vectorized
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    _store(acc, rows, cols, num_rows, N, pid_k, scale_ptr, bias_ptr, out_ptr, SPLIT_K,
           HAS_BIAS)


@triton.jit
def _fp8_weight_gemv_kernel(
    x_ptr,  # [1, K], contiguous
    w_ptr, scale_ptr, bias_ptr, out_ptr,  # as in _fp8_weight_gemm_kernel
    N, K, k_per_split,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One row: products and sums in fp32 registers, no MMA (nothing to lay out for it). Each
    thread keeps its own partial sums over K and the threads reduce once at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for start in range(k_lo, k_hi, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = (ks < k_hi) | EVEN_K
        x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * x[None, :]
    _store(tl.sum(acc, axis=1)[None, :], tl.arange(0, 1), cols, 1, N, pid_k, scale_ptr,
           bias_ptr, out_ptr, SPLIT_K, HAS_BIAS)


@triton.jit(do_not_specialize=["num_rows"])
def _sum_splits_kernel(
    part_ptr,  # [SPLIT_K, num_rows, N] fp32, already scaled
    bias_ptr, out_ptr,  # [N], [num_rows, N]
    num_rows, N,
    BLOCK: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (split * num_rows + row) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=64)
def choose_tiles(n: int, k: int, one_row: bool) -> Tiles:
    """The sweep's best tiles, as rules (H200; within ~5 % of the best on each 8B layer)."""
    if one_row:  # the GEMV: fewer channels a program, each read further, for bigger matrices
        if k >= 8192:
            return Tiles(2, 2048, 1, num_warps=4, num_stages=3)
        if n * k >= 48 * 2**20:
            return Tiles(4, 1024, 1, num_warps=4, num_stages=3)
        if n * k >= 24 * 2**20:
            return Tiles(4, 2048, 1, num_warps=4, num_stages=3)
        return Tiles(8, 1024, 1, num_warps=4, num_stages=2)
    # MMA: narrow layers with a long inner dimension split it in 4 (more programs per SM)
    return Tiles(32, 128, 4 if n < 8192 and k >= 2048 else 1, num_warps=4, num_stages=3)


def fp8_weight_gemm_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None,
                           tiles: Tiles | None = None, gemv: bool = True) -> torch.Tensor:
    """x [M, K] (M <= 16) times FP8 weight [N, K] with scales (N values) -> [M, N] in x's dtype.

    ``tiles``: None for ``choose_tiles`` (tests and benchmarks set them). One row takes the
    GEMV kernel unless ``gemv`` is False.
    """
    num_rows, k = x.shape
    n = weight.shape[0]
    if num_rows > MAX_ROWS or weight.shape[1] != k or x.stride(1) != 1 or \
            not weight.is_contiguous():
        raise ValueError(f"fp8_weight_gemm takes at most {MAX_ROWS} contiguous rows and a "
                         f"row-major [N, {k}] weight, got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    one_row = num_rows == 1 and gemv
    block_n, block_k, split, num_warps, num_stages = tiles or choose_tiles(n, k, one_row)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    target = out if split == 1 else torch.empty(split, num_rows, n, dtype=torch.float32,
                                                device=x.device)
    has_bias = bias is not None
    grid = (triton.cdiv(n, block_n), split)
    common = dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, EVEN_K=k % block_k == 0,
                  HAS_BIAS=has_bias, num_warps=num_warps, num_stages=num_stages)
    if one_row:
        _fp8_weight_gemv_kernel[grid](x, weight, weight_scale, bias if has_bias else weight_scale,
                                      target, n, k, k_per_split, **common)
    else:
        _fp8_weight_gemm_kernel[grid](
            x, weight, weight_scale, bias if has_bias else weight_scale, target,
            num_rows, n, k, x.stride(0), k_per_split, BLOCK_M=MAX_ROWS,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **common)
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(num_rows, triton.cdiv(n, block))](
            target, bias if has_bias else target, out, num_rows, n,
            BLOCK=block, SPLIT_K=split, HAS_BIAS=has_bias, num_warps=4)
    return out
