"""Triton kernel that stores a step's keys and values into the paged KV cache.

One program per token: it reads the token's slot, loads its ``[num_kv_heads, head_dim]`` key and
value rows and stores them at ``kv_cache[:, slot // block_size, slot % block_size]``. A padding
token (slot ``-1``) stores nothing. An FP8 cache (float8e4nv) stores ``fp8(clamp(k * (1 /
k_scale), -448, 448))``, as ``layers.quantization.fp8.quantize`` does (the reciprocal is rounded
to fp32 on the host, so both round identically), likewise v. The grid depends only on
``num_tokens``, so the launch can be captured in a CUDA graph with a padded token count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim], last dim contiguous
    slot_ptr,  # [num_tokens] int64, -1 = padding
    k_inv_scale, v_inv_scale,  # fp32 1 / k_scale, 1 / v_scale (read when FP8)
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    keep = (heads < NUM_KV_HEADS)[:, None] & (slot >= 0)
    # Padding tokens point at slot 0 so that no address is ever negative, then store nothing.
    slot = tl.maximum(slot, 0)
    dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
           + heads[:, None] * stride_ch + dims[None, :])  # [HEADS_PAD, HEAD_DIM]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=keep)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=keep)
    if FP8:
        k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -FP8_MAX), FP8_MAX)
    tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=keep)
    tl.store(cache_ptr + stride_ckv + dst, v.to(cache_ptr.dtype.element_ty), mask=keep)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> None:
    """Stores k, v [num_tokens, num_kv_heads, head_dim] at their slots; slot -1 is skipped.

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]; k and v may be strided views
    (e.g. slices of a fused qkv projection) as long as their last dim is contiguous. A
    float8_e4m3fn cache stores k / k_scale and v / v_scale.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("k, v and kv_cache need a contiguous last (head_dim) dimension")
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        FP8=kv_cache.dtype == torch.float8_e4m3fn, FP8_MAX=torch.finfo(torch.float8_e4m3fn).max,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
