"""Triton rotary embedding (NeoX "rotate half" layout) of q and k in one launch.

For each head row x = [x1, x2] (halves of head_dim) and the token's cos, sin rows:
``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, i.e.
``out1 = x1 * cos1 - x2 * sin1`` and ``out2 = x2 * cos2 + x1 * sin2``. Both products are
rounded to the output dtype before the sum, as the torch reference's separate kernels round
them, so the two agree up to fp32 contraction on the GPU. cos and sin are read in full (not
one half) so that any table works, M-RoPE's mixed sections included.

q and k may be strided views of the fused qkv projection (last dim contiguous); the outputs are
new contiguous tensors. Programs are laid out as ``(token, head tile)``, the q tiles first, then
the k tiles; the grid depends only on the token count, so the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one program holds: 8 heads of 128, or 16 of 64.
_TILE = 1024


@triton.jit
def _rotate_heads(
    src, dst,  # this token's first head of q (or k) and of its output
    cos, sin,  # this token's cos/sin rows [HEAD_DIM]
    first_head, stride_h, stride_dh,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    heads = first_head + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF_PAD)
    dim_ok = dims < HALF
    mask = (heads < NUM_HEADS)[:, None] & dim_ok[None, :]
    cos1 = tl.load(cos + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    src_off = heads[:, None] * stride_h + dims[None, :]  # [BLOCK_H, HALF_PAD]
    x1 = tl.load(src + src_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + src_off, mask=mask, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    out1 = (x1 * cos1).to(out_ty).to(tl.float32) - (x2 * sin1).to(out_ty).to(tl.float32)
    out2 = (x2 * cos2).to(out_ty).to(tl.float32) + (x1 * sin2).to(out_ty).to(tl.float32)
    dst_off = heads[:, None] * stride_dh + dims[None, :]
    tl.store(dst + dst_off, out1.to(out_ty), mask=mask)
    tl.store(dst + HALF + dst_off, out2.to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr,  # [T, H, D], [T, Hkv, D], last dim contiguous
    cos_ptr, sin_ptr,  # [T, D] rows (any leading stride), last dim contiguous
    q_out_ptr, k_out_ptr,  # contiguous, like q and k
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    Q_TILES: tl.constexpr = (NUM_HEADS + BLOCK_H - 1) // BLOCK_H
    HALF: tl.constexpr = HEAD_DIM // 2
    cos = cos_ptr + token * stride_ct
    sin = sin_ptr + token * stride_st
    if tile < Q_TILES:
        _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * NUM_HEADS * HEAD_DIM,
                      cos, sin, tile * BLOCK_H, stride_qh, HEAD_DIM,
                      NUM_HEADS, HALF, HALF_PAD, BLOCK_H)
    else:
        _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * NUM_KV_HEADS * HEAD_DIM,
                      cos, sin, (tile - Q_TILES) * BLOCK_H, stride_kh, HEAD_DIM,
                      NUM_KV_HEADS, HALF, HALF_PAD, BLOCK_H)


def _rows(t: torch.Tensor, num_tokens: int, head_dim: int) -> torch.Tensor:
    """cos or sin as [T, D] rows: [T, D] and [T, 1, D] are accepted."""
    rows = t.reshape(t.shape[0], t.shape[-1]) if t.dim() == 3 and t.shape[1] == 1 else t
    if rows.dim() != 2 or rows.shape != (num_tokens, head_dim) or rows.stride(1) != 1:
        raise ValueError(f"cos/sin must be [T, D] or [T, 1, D] with T={num_tokens}, "
                         f"D={head_dim} and a contiguous last dim, got {tuple(t.shape)}")
    return rows


def rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k): q [T, H, D], k [T, Hkv, D] (strided views allowed, last dim contiguous).

    cos, sin: [T, D] or [T, 1, D]. Returns new contiguous tensors in the dtype the reference
    gives (q's promoted with cos's); q and k are left as they are. Never synchronizes.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same T and an "
                         "even head_dim")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k need a contiguous last (head_dim) dimension")
    cos, sin = _rows(cos, num_tokens, head_dim), _rows(sin, num_tokens, head_dim)
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(num_heads), max(1, _TILE // (2 * half_pad)))
    tiles = triton.cdiv(num_heads, block_h) + triton.cdiv(num_kv_heads, block_h)
    _rotary_kernel[(num_tokens, tiles)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=half_pad, BLOCK_H=block_h,
        num_warps=max(1, min(8, block_h * half_pad // 128)),
    )
    return q_out, k_out
