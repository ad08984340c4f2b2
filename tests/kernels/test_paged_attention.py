"""The Triton paged attention equals paged_attention_ref on random mixed steps, with and without
a sliding window and a logit soft-cap; the reference's window and cap equal their definition, and
the CPU backend equals the reference.

Every step mixes prompt chunks over a cached prefix (query_len < seq_len), fresh prompts and
decodes with ragged lengths. Cache slots that no real request may read (the tails of blocks,
the padding block 0) and the queries of padding tokens hold NaN, so any masked-load mistake
shows up as NaN in a real row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.backend import AttentionMetadata  # noqa: E402
from pagedllm.attention.torch_backend import (  # noqa: E402
    TorchAttentionBackend,
    paged_attention_ref,
    write_kv,
)
from pagedllm.attention.triton_backend import (  # noqa: E402
    TritonAttentionBackend,
    build_tile_map,
    choose_block_m,
    choose_num_splits,
    fill_tile_map,
    graph_block_m,
    graph_num_tiles,
)
from pagedllm.kernels.paged_attention import paged_attention_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
NUM_KV_HEADS = 2

# (query_len, seq_len) per request: chunk over a prefix, decodes, fresh prompt, 1-token context.
MIXED = [(20, 45), (1, 33), (7, 7), (1, 1), (1, 70), (12, 16)]
# A decode-only step padded for a CUDA graph, both ways: a dummy request with one token and an
# empty context (its row must come out 0), and an empty request; plus two padding tokens.
DECODES = [(1, 17), (1, 64), (1, 5), (1, 100), (1, 0), (0, 0)]


@dataclass
class Step:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    kv_cache: torch.Tensor  # cached prefixes written, this step's tokens not yet
    metadata: AttentionMetadata
    num_real_tokens: int


def make_step(reqs: list[tuple[int, int]], *, block_size: int, group: int, head_dim: int,
              dtype: torch.dtype, pad_tokens: int = 0, seed: int = 0) -> Step:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [math.ceil(seq_len / block_size) for _, seq_len in reqs]
    # Block 0 is never owned: padded block-table entries point at it and it holds NaN.
    ids = (torch.randperm(sum(blocks_per_req), generator=gen) + 1).tolist()
    table = torch.zeros(len(reqs), max(1, *blocks_per_req), dtype=torch.int32)
    cache = torch.full((2, len(ids) + 1, block_size, NUM_KV_HEADS, head_dim), float("nan"))
    flat = cache.view(2, -1, NUM_KV_HEADS, head_dim)
    slots: list[int] = []
    for r, (query_len, seq_len) in enumerate(reqs):
        owned, ids = ids[:blocks_per_req[r]], ids[blocks_per_req[r]:]
        table[r, :len(owned)] = torch.tensor(owned, dtype=torch.int32)
        pos_slots = [owned[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        prefix = pos_slots[:seq_len - query_len]
        flat[:, prefix] = torch.randn(2, len(prefix), NUM_KV_HEADS, head_dim, generator=gen)
        slots += pos_slots[seq_len - query_len:] if seq_len else [-1] * query_len
    real = len(slots)
    num_tokens = real + pad_tokens
    q = torch.randn(num_tokens, NUM_KV_HEADS * group, head_dim, generator=gen)
    q[real:] = float("nan")
    k, v = torch.randn(2, num_tokens, NUM_KV_HEADS, head_dim, generator=gen)
    query_lens = [n for n, _ in reqs]
    seq_lens = [n for _, n in reqs]
    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=torch.tensor(slots + [-1] * pad_tokens, device=DEVICE),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                     dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=table.to(DEVICE), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    to = {"device": DEVICE, "dtype": dtype}
    return Step(q.to(**to), k.to(**to), v.to(**to), cache.to(**to), metadata, real)


def reference(step: Step, scale: float, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache with the step's K/V written, expected output rows of real tokens); ``options``:
    sliding_window, softcap."""
    cache = step.kv_cache.clone()
    write_kv(step.k, step.v, cache, step.metadata.slot_mapping)
    out = paged_attention_ref(step.q, cache, step.metadata, scale, **options)
    return cache, out[:step.num_real_tokens]


def run_kernel(step: Step, cache: torch.Tensor, scale: float, *, block_m: int,
               num_splits: int, one_tile_per_req: bool, **options: Any) -> torch.Tensor:
    group_pad = 1 << (step.q.shape[1] // NUM_KV_HEADS - 1).bit_length()
    md = step.metadata
    tile_map = None if one_tile_per_req else build_tile_map(
        md.query_lens_cpu, block_m // group_pad, DEVICE)
    out = paged_attention_triton(step.q, cache, md.query_start_loc, md.seq_lens, md.block_tables,
                                 scale, block_m=block_m, tile_map=tile_map,
                                 num_splits=num_splits, **options)
    return out[:step.num_real_tokens]


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "NaN/inf in a real row"
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(bs, d, g) for bs in (16, 32) for d in (64, 128) for g in (1, 3, 4, 8)]


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_mixed_step_matches_reference(case: int, num_splits: int) -> None:
    block_size, head_dim, group = SHAPES[case]
    dtype = DTYPES[case % len(DTYPES)]
    block_m = 16 if case % 4 in (1, 2) else 64  # groups 3, 4: tiles of 4 query tokens
    step = make_step(MIXED + [(0, 0)], block_size=block_size, group=group, head_dim=head_dim,
                     dtype=dtype, pad_tokens=3, seed=case)
    scale = head_dim ** -0.5
    cache, expected = reference(step, scale)
    out = run_kernel(step, cache, scale, block_m=block_m, num_splits=num_splits,
                     one_tile_per_req=False)
    assert_matches(out, expected)


@pytest.mark.parametrize("group,num_splits,block_size,dtype", [
    (1, 1, 16, torch.float32),
    (2, 2, 32, torch.bfloat16),
    (4, 8, 16, torch.float16),  # more slices than a 5-token context has tiles: empty slices
    (8, 3, 32, torch.float32),  # a split count that is not a power of two
])
def test_padded_decode_step_without_tile_map(group: int, num_splits: int, block_size: int,
                                             dtype: torch.dtype) -> None:
    step = make_step(DECODES, block_size=block_size, group=group, head_dim=64, dtype=dtype,
                     pad_tokens=2, seed=group)
    cache, expected = reference(step, 0.125)
    out = run_kernel(step, cache, 0.125, block_m=16, num_splits=num_splits,
                     one_tile_per_req=True)
    assert_matches(out, expected)


@pytest.mark.parametrize("num_splits,dtype", [
    (None, torch.float32), (1, torch.bfloat16), (2, torch.float16)])
def test_backend_writes_and_attends(num_splits: int | None, dtype: torch.dtype) -> None:
    # The 40-token chunk needs several query tiles, hence a tile map.
    reqs = [(40, 50), (1, 20), (3, 9), (0, 0)]
    step = make_step(reqs, block_size=16, group=4, head_dim=64, dtype=dtype, pad_tokens=1, seed=7)
    expected_cache, expected = reference(step, 0.125)
    backend = TritonAttentionBackend(num_splits=num_splits)
    backend.prepare(step.metadata, block_size=16)
    cache = step.kv_cache
    for _ in range(2):  # two layers share one step's plan
        out = backend.forward(step.q, step.k, step.v, cache, step.metadata, 0.125)
        assert_matches(out[:step.num_real_tokens], expected)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0, equal_nan=True)
    plan = backend.plan(step.metadata.backend_data, 4 * NUM_KV_HEADS, NUM_KV_HEADS, dtype)
    block_q = plan.block_m // 4
    assert plan.tile_map is not None
    assert plan.tile_map.shape[0] == sum(math.ceil(q / block_q) for q, _ in reqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_tile_map_padded_with_an_empty_request(dtype: torch.dtype) -> None:
    """A CUDA graph of a step with prompt tokens (worker/cuda_graphs.py) hands the backend its
    static inputs: requests past the step's have no rows and no context, the tile map is padded
    with tiles of one of them, and the tokens past the step's have no slot. The real rows equal
    the reference, whatever the padding."""
    reqs = [(40, 50), (1, 20), (3, 9)]
    step = make_step(reqs, block_size=16, group=4, head_dim=64, dtype=dtype, pad_tokens=5, seed=3)
    expected_cache, expected = reference(step, 0.125)
    md, max_reqs, real = step.metadata, 6, step.num_real_tokens
    _, block_q = graph_block_m(4 * NUM_KV_HEADS, NUM_KV_HEADS, dtype)
    num_tiles = graph_num_tiles(max_reqs, md.num_tokens, block_q)
    tiles = fill_tile_map(np.array(md.query_lens_cpu), block_q, num_tiles, max_reqs)
    starts = torch.full((max_reqs + 2,), real, dtype=torch.int32, device=DEVICE)
    starts[:len(reqs) + 1] = md.query_start_loc
    seq_lens = torch.zeros(max_reqs + 1, dtype=torch.int32, device=DEVICE)
    seq_lens[:len(reqs)] = md.seq_lens
    tables = torch.zeros(max_reqs + 1, md.block_tables.shape[1], dtype=torch.int32,
                         device=DEVICE)
    tables[:len(reqs)] = md.block_tables
    graph_md = AttentionMetadata(
        num_tokens=md.num_tokens, slot_mapping=md.slot_mapping, query_start_loc=starts,
        seq_lens=seq_lens, block_tables=tables, max_query_len=md.num_tokens, max_seq_len=4096,
        query_lens_cpu=[0] * (max_reqs + 1), seq_lens_cpu=[0] * (max_reqs + 1),
        tile_map=torch.from_numpy(tiles).to(DEVICE))
    backend = TritonAttentionBackend()
    backend.prepare(graph_md, block_size=16)
    cache = step.kv_cache
    out = backend.forward(step.q, step.k, step.v, cache, graph_md, 0.125)
    assert_matches(out[:real], expected)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0, equal_nan=True)
    plan = backend.plan(graph_md.backend_data, 4 * NUM_KV_HEADS, NUM_KV_HEADS, dtype)
    assert plan.num_splits == 1 and plan.tile_map is graph_md.tile_map


def test_fill_tile_map_is_build_tile_map_then_padding() -> None:
    lens = [40, 1, 0, 3, 17]
    tiles = fill_tile_map(np.array(lens), 8, graph_num_tiles(5, sum(lens), 8), empty_req=5)
    built = build_tile_map(lens, 8, torch.device("cpu")).numpy()
    assert (tiles[:len(built)] == built).all()
    assert (tiles[len(built):] == [5, 0]).all() and len(tiles) == 5 + 8
    with pytest.raises(ValueError, match="do not fit"):
        fill_tile_map(np.array(lens), 8, len(built) - 1, empty_req=5)


def test_decode_plan_is_graph_safe() -> None:
    step = make_step(DECODES, block_size=16, group=2, head_dim=64, dtype=torch.float32)
    backend = TritonAttentionBackend()
    backend.prepare(step.metadata, block_size=16)
    plan = backend.plan(step.metadata.backend_data, 2 * NUM_KV_HEADS, NUM_KV_HEADS,
                        torch.bfloat16)
    assert plan.tile_map is None  # grid = (num_reqs, num_kv_heads, num_splits)
    assert plan.block_m == 16


def test_split_heuristic() -> None:
    assert choose_num_splits(num_programs=8, max_seq_len=8192, num_sms=132) == 16
    assert choose_num_splits(num_programs=64, max_seq_len=8192, num_sms=132) == 4
    assert choose_num_splits(num_programs=256, max_seq_len=8192, num_sms=132) == 1
    assert choose_num_splits(num_programs=8, max_seq_len=300, num_sms=132) == 1
    assert choose_num_splits(num_programs=8, max_seq_len=1024, num_sms=132) == 4


def test_block_m_and_tile_map() -> None:
    assert choose_block_m(max_query_len=1, group_pad=2) == 16
    assert choose_block_m(max_query_len=1, group_pad=32) == 32
    assert choose_block_m(max_query_len=5, group_pad=4) == 32
    assert choose_block_m(max_query_len=2048, group_pad=2) == 128
    assert choose_block_m(max_query_len=2048, group_pad=2, max_rows=16) == 16
    assert choose_block_m(max_query_len=2048, group_pad=32, max_rows=16) == 32
    tiles = build_tile_map([3, 0, 1, 9], block_q=4, device=torch.device("cpu"))
    assert tiles.tolist() == [[0, 0], [2, 0], [3, 0], [3, 4], [3, 8]]


# --- per-layer options: sliding window (a query at p sees keys in (p - w, p]), logit soft-cap ----

# (sliding_window, softcap): a window inside one block, one block, several blocks; caps alone
# and with a window. MIXED's 20-token chunk starts at position 25, so a window of 5 or 16 skips
# its first block.
OPTIONS = [(5, 0.0), (16, 0.0), (40, 0.0), (0, 2.0), (16, 3.0)]


def definition(step: Step, cache: torch.Tensor, scale: float, window: int,
               softcap: float) -> torch.Tensor:
    """Query by query over the positions it sees, listed explicitly. [real tokens, H, D]"""
    md, block_size = step.metadata, cache.shape[2]
    group = step.q.shape[1] // NUM_KV_HEADS
    out = torch.empty(step.num_real_tokens, *step.q.shape[1:])
    for r, (q_start, seq_len) in enumerate(zip(md.query_starts_cpu, md.seq_lens_cpu)):
        for j in range(md.query_lens_cpu[r]):
            p = seq_len - md.query_lens_cpu[r] + j
            seen = range(max(0, p - window + 1) if window else 0, p + 1)
            blocks = md.block_tables[r].cpu()[[s // block_size for s in seen]]
            k, v = cache.cpu().float()[:, blocks, [s % block_size for s in seen]]  # [n, Hkv, D]
            q = step.q[q_start + j].cpu().float()  # [H, D]
            scores = torch.einsum("hd,nhd->hn", q, k.repeat_interleave(group, 1)) * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            out[q_start + j] = torch.einsum("hn,nhd->hd", scores.softmax(-1),
                                            v.repeat_interleave(group, 1))
    return out


def mixed_step(dtype: torch.dtype = torch.float32, group: int = 2, seed: int = 0) -> Step:
    return make_step(MIXED + [(0, 0)], block_size=16, group=group, head_dim=64, dtype=dtype,
                     pad_tokens=2, seed=seed)


@pytest.mark.parametrize("window,softcap", OPTIONS)
def test_reference_options_follow_their_definition(window: int, softcap: float) -> None:
    step = mixed_step()
    cache, out = reference(step, 0.125, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out.cpu(), definition(step, cache, 0.125, window, softcap))
    assert not torch.allclose(out, reference(step, 0.125)[1])  # the option changes the output


def test_cpu_backend_matches_reference_per_layer_options() -> None:
    """Layers with different options share one step's metadata (masks cached per window)."""
    step = mixed_step()
    backend = TorchAttentionBackend()
    backend.prepare(step.metadata, block_size=16)
    # The engine's blocks hold zeros past their last written slot (see TorchAttentionBackend).
    cache = step.kv_cache.nan_to_num(0.0)
    for window, softcap in [*OPTIONS, (0, 0.0), (5, 0.0)]:
        _, expected = reference(step, 0.125, sliding_window=window, softcap=softcap)
        out = backend.forward(step.q, step.k, step.v, cache, step.metadata, 0.125,
                              sliding_window=window, softcap=softcap)
        assert_matches(out[:step.num_real_tokens], expected)


@pytest.mark.parametrize("window,softcap", OPTIONS)
@pytest.mark.parametrize("num_splits,dtype", [(1, torch.float32), (2, torch.bfloat16)])
def test_kernel_options_match_reference(window: int, softcap: float, num_splits: int,
                                        dtype: torch.dtype) -> None:
    step = mixed_step(dtype, group=4, seed=window)
    cache, expected = reference(step, 0.125, sliding_window=window, softcap=softcap)
    out = run_kernel(step, cache, 0.125, block_m=16, num_splits=num_splits,
                     one_tile_per_req=False, sliding_window=window, softcap=softcap)
    assert_matches(out, expected)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_kernel_window_on_a_padded_decode_step(num_splits: int) -> None:
    """A CUDA-graph decode step: each request reads its last 24 positions only."""
    step = make_step(DECODES, block_size=16, group=2, head_dim=64, dtype=torch.float32,
                     pad_tokens=2, seed=3)
    cache, expected = reference(step, 0.125, sliding_window=24, softcap=5.0)
    out = run_kernel(step, cache, 0.125, block_m=16, num_splits=num_splits,
                     one_tile_per_req=True, sliding_window=24, softcap=5.0)
    assert_matches(out, expected)
