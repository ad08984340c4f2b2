"""Triton fused MoE: each token's top-k experts as two grouped GEMMs over expert-contiguous blocks.

With T tokens and top-k routing there are P = T * k (token, expert) pairs; pair p is token
p // k's slot p % k. The pairs are sorted by expert and each expert's run is padded to a
multiple of BLOCK_M, so every BLOCK_M-row block of the sorted order belongs to one expert
(``align_pairs_by_expert``). A program then multiplies its block's rows by that expert's weight
tile, gathering input rows and scattering output rows by pair index (the idea of vLLM's
fused_moe, written anew):

1. gate/up: [P, 2I] = x[p // k] @ w13[e]^T
2. SiLU-and-mul: [P, I] (``kernels.activation``)
3. down: [P, H] = act[p] @ w2[e]^T, scaled by pair p's routing weight in the fp32 accumulator
4. the k slots of each token summed (torch, accumulating in fp32 as the reference's sum does)

No host synchronization: the sort and padding are torch ops on the device and the grid is sized
by the worst-case padding, P + min(E, P) * (BLOCK_M - 1) rows, whose unused blocks exit at once,
so the launch depends only on T and is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.activation import silu_and_mul_triton


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: gate/up reads x (row = pair // TOP_K), down reads act (row = pair)
    w_ptr,  # [E, N, K]: the experts' weights, out = a @ w[e]^T
    out_ptr,  # [P, N], row = pair
    pair_weights_ptr,  # [P] routing weights (read only with MUL_WEIGHTS)
    sorted_pairs_ptr,  # [padded] pair indices, expert-contiguous; num_pairs marks padding
    block_experts_ptr,  # [padded / BLOCK_M] each block's expert; NUM_EXPERTS: no work
    num_pairs, N, K,
    stride_am, stride_we, stride_wn, stride_wk, stride_om,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert >= NUM_EXPERTS:  # past the last expert's padded run
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = pairs < num_pairs
    rows = (pairs // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    w_base = w_ptr + expert * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_base + ks[:, None] * stride_wk,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    if MUL_WEIGHTS:
        scale = tl.load(pair_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def align_pairs_by_expert(ids: torch.Tensor, num_experts: int, block_m: int,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs [R] int32, block_experts [R / block_m] int32).

    ``sorted_pairs`` lists the pair indices expert by expert, each expert's run padded with
    P (= T * k, "no pair") to a multiple of ``block_m``; R is the worst case, so its tail is
    padding. ``block_experts[b]`` is the expert of rows [b * block_m, (b + 1) * block_m), or
    ``num_experts`` past the last run."""
    pair_ids = ids.flatten()
    num_pairs = pair_ids.numel()
    # scatter_add, not bincount: bincount on CUDA reads the max back to the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, pair_ids, torch.ones_like(pair_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(pair_ids, stable=True)  # pairs, expert-contiguous
    sorted_ids = pair_ids[order]
    rank = torch.arange(num_pairs, device=ids.device) - (counts.cumsum(0) - counts)[sorted_ids]
    rows = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[(padded_end - padded)[sorted_ids] + rank] = order.to(torch.int32)
    starts = torch.arange(0, rows, block_m, device=ids.device)
    block_experts = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    return sorted_pairs, block_experts


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                  pair_weights: torch.Tensor | None, sorted_pairs: torch.Tensor,
                  block_experts: torch.Tensor, top_k: int, block_m: int) -> None:
    """out[p] = a[p // top_k] @ w[expert of p]^T (x pair_weights[p]) for every pair p."""
    num_experts, n, k = w.shape
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, out if pair_weights is None else pair_weights, sorted_pairs, block_experts,
        out.shape[0], n, k, a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        TOP_K=top_k, NUM_EXPERTS=num_experts, MUL_WEIGHTS=pair_weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights and ids [T, k] -> [T, H] in x's dtype:
    sum over slots j of weights[t, j] * down(silu(gate) * up) of expert ids[t, j] on x[t].

    x's last dim and the weights' must be contiguous."""
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_experts_triton needs contiguous last dims")
    out = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    if num_pairs:
        # small blocks when few pairs share an expert (decode), larger ones for prefill
        block_m = 16 if num_pairs <= 4 * w13.shape[0] else 64
        sorted_pairs, block_experts = align_pairs_by_expert(ids, w13.shape[0], block_m)
        gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
        _grouped_gemm(x, w13, gate_up, None, sorted_pairs, block_experts, top_k, block_m)
        act = silu_and_mul_triton(gate_up)  # [P, I]
        _grouped_gemm(act, w2, out, weights.flatten(), sorted_pairs, block_experts, 1, block_m)
    return out.view(num_tokens, top_k, w2.shape[1]).sum(dim=1)
