"""Plain-PyTorch paged attention: the exact reference every kernel is tested against.

``paged_attention_ref`` is the slow, obviously-correct twin (one request at a time).
``TorchAttentionBackend`` computes the same thing faster on the CPU: the step's decodes
(one query token each) go through one batched SDPA over padded, gathered K/V; prompt chunks go
one request at a time with an explicit causal mask offset by the cached prefix. A step that is
one request decoding one token (batch-1 decode, the chat case) takes a path of its own: its K/V
are read in place when its blocks are consecutive, and three products attend with no mask and
no padding (SDPA's call and the batched path's indexing cost more than the arithmetic there).

A sliding window is one more condition in the mask (masks are built once per step and window,
and shared by the layers with that window); a chunk gathers only the blocks its window reaches.
Soft-capped scores need the scores themselves, which SDPA does not expose, so a soft-capped
layer forms them explicitly (as transformers' eager attention does).

An FP8 cache is quantized on write (``write_kv``) and upcast on read; its per-tensor scales fold
into the score scale (k) and the output (v), the same arithmetic as the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.layers.quantization.fp8 import FP8_DTYPE, quantize


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, padded: bool = True, k_scale: float = 1.0,
             v_scale: float = 1.0) -> None:
    """Stores k, v [num_tokens, num_kv_heads, head_dim] at their slots; slot -1 is skipped
    (``padded=False`` promises there is none). An FP8 cache stores k / k_scale, v / v_scale."""
    two, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(two, num_blocks * block_size, kv_heads, head_dim)
    if padded:
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    slots = slot_mapping
    if kv_cache.dtype == FP8_DTYPE:  # index_copy_ has no fp8 kernel: copy the bytes
        flat = flat.view(torch.uint8)
        k, v = quantize(k, k_scale).view(torch.uint8), quantize(v, v_scale).view(torch.uint8)
    else:
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions 0..seq_len-1 of one request. [seq_len] int64"""
    pos = torch.arange(seq_len, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


def _causal_mask(query_len: int, seq_len: int, device: torch.device, window: int = 0,
                 first: int = 0) -> torch.Tensor:
    """Which keys at positions first..seq_len-1 each query row sees. [query_len, seq_len - first]
    bool. Query row j sits at position p = seq_len - query_len + j and sees keys in
    (p - window, p], or [0, p] when window is 0."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(first, seq_len, device=device)[None, :]
    visible = k_pos <= q_pos
    if window:
        visible &= k_pos > q_pos - window
    return visible


def _first_visible(query_len: int, seq_len: int, window: int) -> int:
    """The first position any of a chunk's queries sees (its first query's window start)."""
    return max(0, seq_len - query_len - window + 1) if window else 0


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """q: [B, q_len, H, D]; k, v: [B, kv_len, Hkv, D]; mask: [B, 1, q_len, kv_len], or None
    for plain causal attention (q_len == kv_len).

    Returns [B, q_len, H, D].
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        is_causal=mask is None, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float, softcap: float) -> torch.Tensor:
    """``_sdpa``, with the scores soft-capped when ``softcap`` > 0: then formed explicitly, in
    transformers' eager order (scale, divide by the cap, tanh, multiply by it, mask, softmax)."""
    if not softcap:
        return _sdpa(q, k, v, mask, scale)
    group = q.shape[2] // k.shape[2]
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, kv_len, D]
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = q.transpose(1, 2) @ k.transpose(2, 3) * scale  # [B, H, q_len, kv_len]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:  # plain causal: q_len == kv_len
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                        scale: float, *, sliding_window: int = 0, softcap: float = 0.0,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Attention of the step's queries over the paged cache, one request at a time.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim] (float32 math).
    Assumes the step's K/V are already written. Reads every position of a request's context,
    so that a window's mask, not which blocks are read, is what is tested. An FP8 cache is
    dequantized (fp8 * k_scale, fp8 * v_scale) before anything else.
    """
    if kv_cache.dtype != FP8_DTYPE:
        k_scale = v_scale = 1.0
    block_size = kv_cache.shape[2]
    flat = kv_cache.flatten(1, 2)  # [2, num_slots, Hkv, D]
    out = torch.empty_like(q)
    starts = metadata.query_starts_cpu
    for r, seq_len in enumerate(metadata.seq_lens_cpu):
        start, end = starts[r], starts[r + 1]
        slots = context_slots(metadata.block_tables[r], seq_len, block_size)
        k, v = flat[0, slots].float() * k_scale, flat[1, slots].float() * v_scale
        mask = _causal_mask(end - start, seq_len, q.device, sliding_window)
        o = _attend(q[None, start:end].float(), k[None], v[None], mask[None, None], scale,
                    softcap)
        out[start:end] = o[0].to(q.dtype)
    return out


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                softcap: float) -> torch.Tensor:
    """One query token over the keys it sees, no mask: q [H, D]; k, v [L, Hkv, D] -> [H, D] in
    q's dtype, computed in float32. Scores are soft-capped as in ``_attend`` (scale, divide by
    the cap, tanh, multiply by it)."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    q32 = q.float().reshape(kv_heads, -1, head_dim)  # [Hkv, G, D]: heads sharing a KV head
    scores = torch.bmm(q32, k.float().permute(1, 2, 0)).mul_(scale)  # [Hkv, G, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    out = torch.bmm(scores.softmax(dim=-1), v.float().transpose(0, 1))  # [Hkv, G, D]
    return out.view(-1, head_dim).to(q.dtype)


DECODE_GROUPS = 4  # decodes are sorted by length and padded per group, not to the longest


@dataclass
class _DecodeGroup:
    """Single-token requests of similar length, attended together over padded K/V."""

    rows: torch.Tensor  # [n] query rows
    blocks: torch.Tensor  # [n * width] block ids, row-major (pad -> block 0)
    seq_lens: torch.Tensor  # [n, 1] int64
    num_positions: int  # width * block_size
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> mask
    # Gather buffers, allocated by the first layer and reused by the others.
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None

    def mask(self, window: int) -> torch.Tensor:
        """[n, 1, 1, width * block_size] bool: position < seq_len (and >= seq_len - window)."""
        if window not in self.masks:
            pos = torch.arange(self.num_positions, device=self.seq_lens.device)[None, :]
            visible = pos < self.seq_lens
            if window:
                visible &= pos >= self.seq_lens - window
            self.masks[window] = visible[:, None, None, :]
        return self.masks[window]


@dataclass
class _Chunk:
    """A request with several query rows: a prompt chunk, over a cached prefix or not."""

    start: int  # query rows start:end
    end: int
    blocks: torch.Tensor  # [ceil(seq_len / block_size)] its block ids
    seq_len: int
    block_size: int
    masks: dict[int, tuple[int, torch.Tensor | None]] = field(default_factory=dict)

    def window_view(self, window: int) -> tuple[int, torch.Tensor | None]:
        """(first block to read, mask over the positions from it on, or None for plain causal
        attention): blocks wholly left of the first query's window are not read."""
        if window not in self.masks:
            query_len = self.end - self.start
            first = _first_visible(query_len, self.seq_len, window) // self.block_size
            plain = query_len == self.seq_len and (not window or window >= self.seq_len)
            mask = None if plain else _causal_mask(
                query_len, self.seq_len, self.blocks.device, window, first * self.block_size)
            self.masks[window] = (first, mask)
        return self.masks[window]


@dataclass
class _SingleDecode:
    """The step is one request decoding one token."""

    blocks: torch.Tensor  # [ceil(seq_len / block_size)] its block ids
    first_block: int | None  # the blocks are first_block, first_block + 1, ...: read in place
    seq_len: int
    fresh_blocks: torch.Tensor  # [1] the block the token starts, or [0]

    @classmethod
    def plan(cls, metadata: AttentionMetadata, block_size: int) -> _SingleDecode | None:
        """The plan of a one-token step with one request; None if the token is padding."""
        slot = int(metadata.slot_mapping[0])  # host data on the CPU: no device sync
        if slot < 0:
            return None
        seq_len = metadata.seq_lens_cpu[0]
        blocks = metadata.block_tables[0, :-(-seq_len // block_size)]
        ids = blocks.tolist()
        consecutive = ids == list(range(ids[0], ids[0] + len(ids)))
        fresh = metadata.slot_mapping[:1 if slot % block_size == 0 else 0] // block_size
        return cls(blocks.long(), ids[0] if consecutive else None, seq_len, fresh)

    def read(self, rows: torch.Tensor, window: int, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [L, Hkv, D] of the positions the token sees (the last ``window`` with a
        window); rows: the cache as [2, num_blocks, block_size * Hkv * D]."""
        block_size = rows.shape[2] // (kv_heads * head_dim)
        start = max(0, self.seq_len - window) if window else 0
        first = start // block_size  # blocks wholly before the window are not read
        if self.first_block is not None:
            kv = rows.narrow(1, self.first_block + first, len(self.blocks) - first)
        else:
            kv = rows.index_select(1, self.blocks[first:])
        kv = kv.view(2, -1, kv_heads, head_dim)  # [2, positions from the first block, Hkv, D]
        lo, hi = start - first * block_size, self.seq_len - first * block_size
        return kv[0, lo:hi], kv[1, lo:hi]


@dataclass
class _TorchStepData:
    fresh_blocks: torch.Tensor  # blocks whose first slot is written this step: cleared first
    padded: bool  # some slot is -1
    decodes: list[_DecodeGroup]
    chunks: list[_Chunk]
    single: _SingleDecode | None = None  # the step is one decode (then decodes, chunks: [])


class TorchAttentionBackend(AttentionBackend):
    """Gathers K/V a whole block at a time (``index_select`` of contiguous blocks, far cheaper
    than one index per token) and attends with SDPA.

    Whole-block reads include the slots past a request's length. They are masked, but a NaN
    there would still poison the row (0 x NaN), so a block is zeroed when its first slot is
    written: its tail then holds zeros or this request's own values, never stale memory."""

    name = "torch"

    def prepare(self, metadata: AttentionMetadata, block_size: int) -> None:
        if metadata.num_tokens == 1 and metadata.query_lens_cpu == [1]:
            single = _SingleDecode.plan(metadata, block_size)
            if single is not None:
                metadata.backend_data = _TorchStepData(single.fresh_blocks, False, [], [],
                                                       single)
                return
        slots = metadata.slot_mapping
        fresh = slots[(slots >= 0) & (slots % block_size == 0)] // block_size
        padded = bool((slots < 0).any())  # host data on the CPU: no device sync
        starts = metadata.query_starts_cpu
        decodes: list[int] = []
        chunks = []
        for r, seq_len in enumerate(metadata.seq_lens_cpu):
            start, end = starts[r], starts[r + 1]
            if end - start == 1:
                decodes.append(r)
                continue
            blocks = metadata.block_tables[r, :-(-seq_len // block_size)].long()
            chunks.append(_Chunk(start, end, blocks, seq_len, block_size))
        decodes.sort(key=lambda r: metadata.seq_lens_cpu[r])
        size = max(1, -(-len(decodes) // DECODE_GROUPS))
        groups = [self._decode_group(metadata, decodes[i:i + size], block_size)
                  for i in range(0, len(decodes), size)]
        metadata.backend_data = _TorchStepData(fresh, padded, groups, chunks)

    @staticmethod
    def _decode_group(metadata: AttentionMetadata, reqs: list[int],
                      block_size: int) -> _DecodeGroup:
        device = metadata.block_tables.device
        width = -(-metadata.seq_lens_cpu[reqs[-1]] // block_size)  # the longest is last
        index = torch.tensor(reqs, dtype=torch.long, device=device)
        starts = metadata.query_starts_cpu
        rows = torch.tensor([starts[r] for r in reqs], dtype=torch.long, device=device)
        blocks = metadata.block_tables[index, :width].long().flatten()
        return _DecodeGroup(rows, blocks, metadata.seq_lens[index].long()[:, None],
                            width * block_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float, *,
                sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                v_scale: float = 1.0) -> torch.Tensor:
        data: _TorchStepData = metadata.backend_data
        if len(data.fresh_blocks):
            kv_cache[:, data.fresh_blocks] = 0
        write_kv(k, v, kv_cache, metadata.slot_mapping, data.padded, k_scale, v_scale)
        fp8 = kv_cache.dtype == FP8_DTYPE
        if fp8:  # attend over the stored values upcast (exact); k_scale joins the score scale
            scale *= k_scale
        out = self._attend_step(q, kv_cache, data, scale, sliding_window, softcap)
        return out * v_scale if fp8 and v_scale != 1.0 else out

    @staticmethod
    def _attend_step(q: torch.Tensor, kv_cache: torch.Tensor, data: _TorchStepData,
                     scale: float, sliding_window: int, softcap: float) -> torch.Tensor:
        """The step's attention over the stored (upcast) values, before any V scale."""
        two, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        # One row per block: index_select of 2-D rows is several times faster than of 4-D.
        rows = kv_cache.view(two, num_blocks, block_size * kv_heads * head_dim)
        if data.single is not None:
            kd, vd = data.single.read(rows, sliding_window, kv_heads, head_dim)
            return _attend_one(q[0], kd, vd, scale, softcap)[None]
        out = torch.empty_like(q)
        for g in data.decodes:
            if g.k_buf is None:
                g.k_buf = rows.new_empty(len(g.blocks), rows.shape[-1])
                g.v_buf = torch.empty_like(g.k_buf)
            shape = (len(g.rows), -1, kv_heads, head_dim)  # [n, width * bs, Hkv, D]
            kd = torch.index_select(rows[0], 0, g.blocks, out=g.k_buf).view(shape).to(q.dtype)
            vd = torch.index_select(rows[1], 0, g.blocks, out=g.v_buf).view(shape).to(q.dtype)
            out[g.rows] = _attend(q[g.rows][:, None], kd, vd, g.mask(sliding_window), scale,
                                  softcap)[:, 0]
        for c in data.chunks:
            first, mask = c.window_view(sliding_window)
            length = c.seq_len - first * block_size  # positions read: from the first block on
            kc = rows[0].index_select(0, c.blocks[first:]).view(-1, kv_heads, head_dim)[:length]
            vc = rows[1].index_select(0, c.blocks[first:]).view(-1, kv_heads, head_dim)[:length]
            out[c.start:c.end] = _attend(q[None, c.start:c.end], kc[None].to(q.dtype),
                                         vc[None].to(q.dtype),
                                         None if mask is None else mask[None, None], scale,
                                         softcap)[0]
        return out
