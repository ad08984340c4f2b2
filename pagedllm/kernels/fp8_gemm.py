"""Triton product of a few rows of activations with an FP8 weight: the decode step's linears.

A decode step multiplies a handful of tokens by every weight, so it is bound by reading the
weight; FP8 halves those bytes. cuBLAS's FP8 products need the activations in FP8 too (one more
kernel per linear to quantize them) and are tuned for large M. Here the activations stay in
their dtype and each weight tile is upcast in registers (exact: e4m3 fits in bf16 and fp16):
``out = (x @ fp8(W)^T) * w_scale + bias``, the weight-only ("W8A16") form.

Tiling. A program owns ``BLOCK_N`` output channels and one of ``SPLIT_K`` slices of the inner
dimension; the rows (at most ``BLOCK_M`` = 16, the smallest MMA height) are all in one tile. Its
loop loads an FP8 weight tile ``[BLOCK_K, BLOCK_N]`` (16 KiB: 256 x 64 or 512 x 32) and the
matching activations ``[BLOCK_M, BLOCK_K]`` and accumulates ``tl.dot`` in fp32; three or four
tiles in flight per SM cover the memory latency. Every SM should own a program: wide layers take
64 channels per program, narrower ones 32, and a layer still too narrow for the SMs (a small
model's) splits the inner dimension, whose fp32 partials ``_sum_splits_kernel`` then sums,
scales, biases and rounds (without a split the main kernel does that). Avoiding the split where
possible saves that second launch. The grid depends on the weight's shape only, so the launch
can be captured in a CUDA graph for any row count up to 16.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # BLOCK_M: rows per launch
TILES = ((64, 256), (32, 512))  # (BLOCK_N, BLOCK_K): 16 KiB of FP8 weight each
MAX_SPLITS = 16


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_weight_gemm_kernel(
    x_ptr,  # [num_rows, K], last dim contiguous
    w_ptr,  # [N, K] float8e4nv, row-major
    scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [num_rows, N] in x's dtype, or fp32 partials [SPLIT_K, num_rows, N]
    num_rows, N, K, stride_x, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        k_ok = ks < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
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
def choose_tiles(n: int, k: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): the widest tile that still gives 90% of the SMs a program;
    else 32 channels and the fewest slices of K (a power of two, each at least one BLOCK_K)
    that do."""
    busy = 0.9 * num_sms
    for block_n, block_k in TILES:
        if triton.cdiv(n, block_n) >= busy:
            return block_n, block_k, 1
    block_n, block_k = TILES[-1]
    programs, split = triton.cdiv(n, block_n), 1
    while programs * split < busy and split * 2 <= MAX_SPLITS and k >= 2 * split * block_k:
        split *= 2
    return block_n, block_k, split


def fp8_weight_gemm_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None,
                           tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) times FP8 weight [N, K] with scales (N values) -> [M, N] in x's dtype.

    ``tiles``: (BLOCK_N, BLOCK_K, SPLIT_K), or None for ``choose_tiles`` (tests set them).
    """
    from pagedllm.attention.triton_backend import device_num_sms

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
    block_n, block_k, split = tiles or choose_tiles(n, k, device_num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    target = out if split == 1 else torch.empty(split, num_rows, n, dtype=torch.float32,
                                                device=x.device)
    has_bias = bias is not None
    _fp8_weight_gemm_kernel[(triton.cdiv(n, block_n), split)](
        x, weight, weight_scale, bias if has_bias else weight_scale, target,
        num_rows, n, k, x.stride(0), k_per_split,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, HAS_BIAS=has_bias,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        # shared memory per stage: 16 KiB of weight + 16 x BLOCK_K activations (<= 32 KiB)
        num_warps=4, num_stages=4 if block_k == 256 else 3)
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(num_rows, triton.cdiv(n, block))](
            target, bias if has_bias else target, out, num_rows, n,
            BLOCK=block, SPLIT_K=split, HAS_BIAS=has_bias, num_warps=4)
    return out
