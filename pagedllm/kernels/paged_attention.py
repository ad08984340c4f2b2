"""Triton paged attention for a mixed step: prompt chunks over a cached prefix, and decodes.

Tiling. A program owns one KV head and one *query tile* of one request: ``BLOCK_Q`` consecutive
query tokens times the ``GROUP`` query heads that share that KV head (GQA), packed into the M
dimension of the tile: row ``m`` is token ``m // GROUP_PAD``, head ``m % GROUP_PAD`` of the group,
so ``BLOCK_M = BLOCK_Q * GROUP_PAD`` rows. Every key/value tile the program loads is used by all
of those rows, so a KV byte is read once per query tile instead of once per query head; for a
decode (one token) the whole GQA group still fills several MMA rows. The program walks the
request's context in KV tiles of ``BLOCK_N`` positions: each position is gathered through the
block table (``block_tables[req, pos // block_size]``), so a tile may span several cache blocks
and any block size works. ``S = Q @ K^T`` and ``O += P @ V`` use ``tl.dot`` (tensor cores, fp32
accumulators) and the softmax is the online one, in fp32 and base 2 (the scale is folded into
``log2(e) * scale``). Query row ``j`` of a request sits at position
``seq_len - query_len + j`` and sees positions ``<=`` it, which covers both a prompt chunk over a
cached prefix and a decode; the loop stops at the tile's last visible position.

Per-layer options (``USE_WINDOW``, ``USE_SOFTCAP`` compile them in only where used). A sliding
window ``w`` hides keys at positions ``<= q_pos - w``; the loop starts at the tile's first query's
window, so the blocks left of it are never read (a decode reads ``w`` positions, not its whole
context). A soft-cap ``c`` replaces each scaled score ``s`` by ``c * tanh(s / c)`` (Gemma 2); the
scale passed is then ``scale / c`` and the cap is applied in base 2 (``c * log2(e)``).

FP8 cache (``--kv-cache-dtype fp8``). K and V tiles are loaded as float8e4nv (half the bytes
of a decode's dominant read) and upcast before the dots, which is exact: to q's dtype, or
under bf16 queries to fp16 (``AttentionTiles.fp16_dot``: q is rounded to fp16, exact within its
range, and e4m3 -> fp16 is one instruction where e4m3 -> bf16 takes several); the
per-tensor ``k_scale`` joins the score scale and ``v_scale`` multiplies the accumulator once at
the end (the combine pass is linear in it), so the result is the reference's dequantized
attention up to accumulation order.

Tile sizes (chosen on the host, see ``triton_backend.choose_block_m``). A decode step uses
``BLOCK_M = 16``, the smallest MMA height: decode is bound by reading KV, and a taller tile would
only add softmax work on empty rows. Prompt chunks use 64 or 128 rows, which Triton lowers to
Hopper warpgroup MMAs (wgmma) and which amortise each KV tile over many queries. ``BLOCK_N = 64``
(32 for head_dim > 128; twice that over an FP8 cache) keeps one K and one V tile at 16 KiB each
(bf16, head_dim 128); the loop
is software-pipelined, with the block-table lookup one stage ahead of the K/V copies.

Which programs exist. With ``ONE_TILE_PER_REQ`` (every request has at most ``BLOCK_Q`` new
tokens: decode-only steps) tile ``t`` is request ``t`` and the grid is
``(num_reqs, num_kv_heads, num_splits)``: no host planning, only ``query_start_loc``, ``seq_lens``
and ``block_tables`` are read, so the launch can be captured in a CUDA graph with padded
requests. Otherwise the host gives a tile map ``[num_tiles, 2]`` = (request, first query row).

Split-KV. When there are too few programs to fill the GPU (small batch, long context), each
program also takes one of ``NUM_SPLITS`` equal, ``BLOCK_N``-aligned slices of the context its
tile reads (from the window's start, or 0, to the request's end; slice length computed on the
device from ``seq_lens``, so a captured graph stays right for any length), and writes
unnormalised partials (running max, sum, accumulator) in fp32.
``_combine_splits_kernel`` then merges the slices of every (token, KV-head group) by the usual
rescaling.

Padding. Rows that are not real (token past the request's query length, head past the group)
are masked on load and store. A request with query_len 0 (graph padding) writes nothing; an
empty slice or empty context gives a zero sum, which is guarded, so no NaN is ever produced.
Output rows that belong to no request are left unwritten.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Finite stand-in for -inf as the running max: exp2(m_old - m_new) stays 1, never NaN, when a
# row has seen only masked (-inf) scores so far.
_NO_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _attend_kv_range(
    q, q_pos,  # [BLOCK_M, HEAD_DIM] queries, [BLOCK_M] their positions
    table,  # this request's row of the block table
    kv_base,  # cache pointer at this KV head
    kv_lo, kv_hi, qk_scale, window, softcap, stride_ckv, stride_cb, stride_cs,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
):
    """Online softmax of q over context positions [kv_lo, kv_hi), causally masked by q_pos
    (and by its window).

    Returns the unnormalised (running max, sum, accumulator), max and sum in base 2.
    """
    dims = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], _NO_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_ctx = pos < kv_hi
        block = tl.load(table + pos // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        slot = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N]
        k = tl.load(kv_base + slot[None, :] + dims[:, None], mask=in_ctx[None, :],
                    other=0.0).to(q.dtype)  # [HEAD_DIM, BLOCK_N]; an FP8 cache upcast
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:  # s is score / c here: tanh(x) = 1 - 2 / (exp(2x) + 1), safe for any x
            s = (1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0)) * softcap
        visible = in_ctx[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_base + stride_ckv + slot[:, None] + dims[None, :], mask=in_ctx[:, None],
                    other=0.0).to(q.dtype)  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# Step-varying ints are not specialized (on == 1 or % 16), so a new batch size never recompiles.
@triton.jit(do_not_specialize=["num_tokens", "stride_bt"])
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    kv_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim], or acc partials [splits, tokens, heads, dim]
    max_ptr, sum_ptr,  # [splits, num_tokens, num_heads] fp32 partials (split mode only)
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,  # [R + 1], [R], [R, max_blocks]
    tile_map_ptr,  # [num_tiles, 2] int32: (request, first query row); unused if ONE_TILE_PER_REQ
    qk_scale, v_scale, window, softcap, num_tokens,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, ONE_TILE_PER_REQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    FP16_DOT: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_TILE_PER_REQ:
        req = tile
        q_first = 0
    else:
        req = tl.load(tile_map_ptr + 2 * tile)
        q_first = tl.load(tile_map_ptr + 2 * tile + 1)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP_PAD  # query row within the request
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = seq_len - q_len + q_idx  # absolute position: sees keys at positions <= q_pos
    token = (q_start + q_idx).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if FP16_DOT:  # bf16 queries over an FP8 cache: e4m3 -> fp16 is one instruction
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    # Keys this tile can see: up to its last query's position (none for a padded request),
    # from its first query's window on.
    kv_end = tl.minimum(seq_len, seq_len - q_len + q_first + BLOCK_Q)
    kv_end = tl.where(q_first < q_len, kv_end, 0)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(seq_len - q_len + q_first - window + 1, 0)
    if NUM_SPLITS == 1:
        kv_lo = kv_start
        kv_hi = kv_end
    else:
        split_len = tl.cdiv(tl.cdiv(seq_len - kv_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = kv_start + split * split_len
        kv_hi = tl.minimum(kv_lo + split_len, kv_end)

    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    m_i, l_i, acc = _attend_kv_range(
        q, q_pos, table, kv_ptr + kv_head * stride_ch, kv_lo, kv_hi, qk_scale, window, softcap,
        stride_ckv, stride_cb, stride_cs, BLOCK_M, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
        USE_WINDOW, USE_SOFTCAP)
    acc = acc * v_scale  # an FP8 cache's values are v / v_scale (1.0 otherwise)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (split * num_tokens + token) * NUM_HEADS + head  # [BLOCK_M] in [splits, T, H]
        tl.store(max_ptr + part, m_i, mask=row_ok)
        tl.store(sum_ptr + part, l_i, mask=row_ok)
        tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_reqs", "num_tokens"])
def _combine_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    acc_ptr, max_ptr, sum_ptr,  # [splits, num_tokens, num_heads(, head_dim)] fp32
    query_start_loc_ptr, num_reqs, num_tokens, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """One program per (token, KV head): merges the slices of the GQA group's heads."""
    token = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, GROUP_PAD)
    head = tl.program_id(1) * GROUP + group
    # Tokens past the last request are graph padding: their partials were never written.
    ok = (group < GROUP) & (token < tl.load(query_start_loc_ptr + num_reqs))
    dims = tl.arange(0, HEAD_DIM)
    m_run = tl.full([GROUP_PAD], _NO_MAX, dtype=tl.float32)
    l_run = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        part = (split * num_tokens + token) * NUM_HEADS + head  # [GROUP_PAD]
        m = tl.load(max_ptr + part, mask=ok, other=_NO_MAX)
        m_new = tl.maximum(m_run, m)
        old, new = tl.exp2(m_run - m_new), tl.exp2(m - m_new)
        l_run = l_run * old + tl.load(sum_ptr + part, mask=ok, other=0.0) * new
        a = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                    other=0.0)
        acc = acc * old[:, None] + a * new[:, None]
        m_run = m_new
    out = acc / tl.where(l_run > 0.0, l_run, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


class AttentionTiles(NamedTuple):
    """A launch's settings: KV positions per tile, warps and pipeline stages of a program, and
    whether an FP8 cache under bf16 queries is multiplied in fp16 (q rounded to fp16, exact
    within its range; e4m3 -> fp16 is one instruction, e4m3 -> bf16 several)."""

    block_n: int
    num_warps: int
    num_stages: int
    fp16_dot: bool = False


def choose_tiles(head_dim: int, block_m: int, fp8_cache: bool, q_dtype: torch.dtype
                 ) -> AttentionTiles:
    """One K and one V tile of 16 KiB each in bf16; an FP8 cache takes tiles of twice the
    positions (the same bytes). On an H200 (``benchmarks/bench_attention.py --fp8``, Qwen3-0.6B
    heads) that gave decodes over an FP8 cache 0.73-0.95x the bf16 cache's time, and prompt
    chunks 0.79-0.88x, where the bf16 cache's tiles gave 0.91-1.20x and 1.08-1.11x.

    The bf16 settings were checked by compiling for sm_90 (ptxas): no register spills for
    head_dim 64-256 (fp32 only with block_m 16, see triton_backend); the FP8 ones were measured,
    not checked for spills.
    """
    block_n = (64 if head_dim <= 128 else 32) * (2 if fp8_cache else 1)
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 2 if block_m >= 128 else 3
    return AttentionTiles(block_n, num_warps, num_stages,
                          fp16_dot=fp8_cache and q_dtype == torch.bfloat16)


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, *, block_m: int,
                           tile_map: torch.Tensor | None, num_splits: int = 1,
                           sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                           v_scale: float = 1.0, tiles: AttentionTiles | None = None
                           ) -> torch.Tensor:
    """Attention of a step's queries over the paged cache (the step's K/V already written).

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim] in q's dtype.
    ``block_m`` rows per tile hold ``block_m // next_pow2(group)`` query tokens; ``tile_map``
    ([num_tiles, 2] int32, (request, first query row)) or None when every request fits one tile;
    ``num_splits`` > 1 splits each request's context into that many slices plus a combine pass.
    ``sliding_window`` > 0: a query at position p sees keys in (p - window, p]; ``softcap`` > 0:
    scores are capped to ``softcap * tanh(score / softcap)``. A float8_e4m3fn cache holds
    k / k_scale and v / v_scale: its values are upcast (to q's dtype, or to fp16 under bf16
    queries, see ``AttentionTiles``), k_scale multiplies the
    score scale and v_scale the output (other caches: q's dtype, the scales are ignored).
    ``tiles``: None for ``choose_tiles`` (benchmarks set them). Rows of tokens that belong to
    no request are left unwritten. Never synchronizes.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if head_dim & (head_dim - 1) or num_heads != group * num_kv_heads or block_m < group_pad:
        raise ValueError(f"unsupported shapes: heads {num_heads}/{num_kv_heads}, "
                         f"head_dim {head_dim}, block_m {block_m}")
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if q.stride(2) != 1 or kv_cache.stride(4) != 1 or not (fp8 or q.dtype == kv_cache.dtype):
        raise ValueError("q and kv_cache need one dtype (or an fp8 cache) and a contiguous "
                         "head_dim")
    if not fp8:
        k_scale = v_scale = 1.0
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    num_reqs = seq_lens.shape[0]
    num_tiles = num_reqs if tile_map is None else tile_map.shape[0]
    if num_tokens == 0 or num_tiles == 0:
        return out
    block_n, num_warps, num_stages, fp16_dot = tiles or choose_tiles(head_dim, block_m, fp8,
                                                                     q.dtype)
    if num_splits > 1:
        part_shape = (num_splits, num_tokens, num_heads)
        m_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        l_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        target = torch.empty(*part_shape, head_dim, dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = target = out
    _paged_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, kv_cache, target, m_part, l_part, query_start_loc, seq_lens, block_tables,
        query_start_loc if tile_map is None else tile_map,
        # Soft-capping needs the plain score / c; without it the log2(e) factor goes in here.
        scale * k_scale / softcap if softcap else scale * k_scale * LOG2_E, v_scale,
        sliding_window, softcap * LOG2_E,
        num_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        ONE_TILE_PER_REQ=tile_map is None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_WINDOW=sliding_window > 0, USE_SOFTCAP=softcap > 0,
        FP16_DOT=fp8 and fp16_dot and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_kv_heads)](
            out, target, m_part, l_part, query_start_loc, num_reqs, num_tokens,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits, num_warps=4 if group_pad * head_dim >= 1024 else 2,
        )
    return out
