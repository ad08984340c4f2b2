"""Plain-PyTorch paged attention: the exact reference every kernel is tested against.

``paged_attention_ref`` is the slow, obviously-correct twin (one request at a time).
``TorchAttentionBackend`` computes the same thing faster on the CPU: the step's decodes
(one query token each) go through one batched SDPA over padded, gathered K/V; prompt chunks go
one request at a time with an explicit causal mask offset by the cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, padded: bool = True) -> None:
    """Stores k, v [num_tokens, num_kv_heads, head_dim] at their slots; slot -1 is skipped
    (``padded=False`` promises there is none)."""
    two, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(two, num_blocks * block_size, kv_heads, head_dim)
    if padded:
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    slots = slot_mapping
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions 0..seq_len-1 of one request. [seq_len] int64"""
    pos = torch.arange(seq_len, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


def _causal_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    # Query row j sits at position seq_len - query_len + j. [query_len, seq_len] bool
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    return torch.arange(seq_len, device=device)[None, :] <= q_pos


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


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """Attention of the step's queries over the paged cache, one request at a time.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim] (float32 math).
    Assumes the step's K/V are already written.
    """
    block_size = kv_cache.shape[2]
    flat = kv_cache.flatten(1, 2)  # [2, num_slots, Hkv, D]
    out = torch.empty_like(q)
    starts = metadata.query_starts_cpu
    for r, seq_len in enumerate(metadata.seq_lens_cpu):
        start, end = starts[r], starts[r + 1]
        slots = context_slots(metadata.block_tables[r], seq_len, block_size)
        k, v = flat[0, slots].float(), flat[1, slots].float()
        mask = _causal_mask(end - start, seq_len, q.device)
        o = _sdpa(q[None, start:end].float(), k[None], v[None], mask[None, None], scale)
        out[start:end] = o[0].to(q.dtype)
    return out


DECODE_GROUPS = 4  # decodes are sorted by length and padded per group, not to the longest


@dataclass
class _DecodeGroup:
    """Single-token requests of similar length, attended together over padded K/V."""

    rows: torch.Tensor  # [n] query rows
    blocks: torch.Tensor  # [n * width] block ids, row-major (pad -> block 0)
    mask: torch.Tensor  # [n, 1, 1, width * block_size] bool: position < seq_len
    # Gather buffers, allocated by the first layer and reused by the others.
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None


@dataclass
class _TorchStepData:
    fresh_blocks: torch.Tensor  # blocks whose first slot is written this step: cleared first
    padded: bool  # some slot is -1
    decodes: list[_DecodeGroup]
    # (start, end, blocks, seq_len, mask or None for plain causal)
    chunks: list[tuple[int, int, torch.Tensor, int, torch.Tensor | None]]


class TorchAttentionBackend(AttentionBackend):
    """Gathers K/V a whole block at a time (``index_select`` of contiguous blocks, far cheaper
    than one index per token) and attends with SDPA.

    Whole-block reads include the slots past a request's length. They are masked, but a NaN
    there would still poison the row (0 x NaN), so a block is zeroed when its first slot is
    written: its tail then holds zeros or this request's own values, never stale memory."""

    name = "torch"

    def prepare(self, metadata: AttentionMetadata, block_size: int) -> None:
        device = metadata.block_tables.device
        starts = metadata.query_starts_cpu
        decodes: list[int] = []
        chunks = []
        for r, seq_len in enumerate(metadata.seq_lens_cpu):
            start, end = starts[r], starts[r + 1]
            if end - start == 1:
                decodes.append(r)
                continue
            blocks = metadata.block_tables[r, :-(-seq_len // block_size)].long()
            fresh_prompt = end - start == seq_len  # no cached prefix: plain causal attention
            chunks.append((start, end, blocks, seq_len,
                           None if fresh_prompt else _causal_mask(end - start, seq_len, device)))
        decodes.sort(key=lambda r: metadata.seq_lens_cpu[r])
        size = max(1, -(-len(decodes) // DECODE_GROUPS))
        groups = [self._decode_group(metadata, decodes[i:i + size], block_size)
                  for i in range(0, len(decodes), size)]
        slots = metadata.slot_mapping
        fresh = slots[(slots >= 0) & (slots % block_size == 0)] // block_size
        padded = bool((slots < 0).any())  # host data on the CPU: no device sync
        metadata.backend_data = _TorchStepData(fresh, padded, groups, chunks)

    @staticmethod
    def _decode_group(metadata: AttentionMetadata, reqs: list[int],
                      block_size: int) -> _DecodeGroup:
        device = metadata.block_tables.device
        width = -(-metadata.seq_lens_cpu[reqs[-1]] // block_size)  # the longest is last
        index = torch.tensor(reqs, dtype=torch.long, device=device)
        positions = torch.arange(width * block_size, device=device)
        mask = positions[None, :] < metadata.seq_lens[index].long()[:, None]
        starts = metadata.query_starts_cpu
        rows = torch.tensor([starts[r] for r in reqs], dtype=torch.long, device=device)
        blocks = metadata.block_tables[index, :width].long().flatten()
        return _DecodeGroup(rows, blocks, mask[:, None, None, :])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        data: _TorchStepData = metadata.backend_data
        if len(data.fresh_blocks):
            kv_cache[:, data.fresh_blocks] = 0
        write_kv(k, v, kv_cache, metadata.slot_mapping, data.padded)
        two, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        # One row per block: index_select of 2-D rows is several times faster than of 4-D.
        rows = kv_cache.view(two, num_blocks, block_size * kv_heads * head_dim)
        out = torch.empty_like(q)
        for g in data.decodes:
            if g.k_buf is None:
                g.k_buf = rows.new_empty(len(g.blocks), rows.shape[-1])
                g.v_buf = torch.empty_like(g.k_buf)
            shape = (len(g.rows), -1, kv_heads, head_dim)  # [n, width * bs, Hkv, D]
            kd = torch.index_select(rows[0], 0, g.blocks, out=g.k_buf).view(shape)
            vd = torch.index_select(rows[1], 0, g.blocks, out=g.v_buf).view(shape)
            out[g.rows] = _sdpa(q[g.rows][:, None], kd, vd, g.mask, scale)[:, 0]
        for start, end, blocks, seq_len, mask in data.chunks:
            kc = rows[0].index_select(0, blocks).view(-1, kv_heads, head_dim)[:seq_len]
            vc = rows[1].index_select(0, blocks).view(-1, kv_heads, head_dim)[:seq_len]
            out[start:end] = _sdpa(q[None, start:end], kc[None], vc[None],
                                   None if mask is None else mask[None, None], scale)[0]
        return out
