"""Triton attention backend (GPU): KV write + one unified paged-attention launch per layer.

Planning happens on the host from the metadata's host ints and lists, never from device tensors:
the query tile height, whether each request fits one tile (then no tile map is needed and the
launch is CUDA-graph safe), the tile -> request map otherwise, and the split-KV factor. A plan
depends on the layer's head geometry, which ``prepare`` does not know, so it is built by the
first layer's ``forward`` and cached in ``metadata.backend_data`` for the step's other layers.

A CUDA graph of a step with prompt tokens (``worker/cuda_graphs.py``) hands over its own static
tile map (``metadata.tile_map``), filled on the host before each replay with
``fill_tile_map`` for the tile height of ``graph_block_m``, and padded with tiles of an empty
request: then the launch has one shape for every step of its token count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import triton

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.kernels.kv_cache_write import write_kv_triton
from pagedllm.kernels.paged_attention import paged_attention_triton
from pagedllm.worker.device_copy import to_device

MAX_BLOCK_M = 128  # query rows (tokens x group heads) per program
# fp32 inputs take the exact (FMA, not tensor-core) dot, whose operands spill registers beyond
# 16 rows; fp32 is the accuracy path on the GPU, not the fast one.
MAX_BLOCK_M_FP32 = 16
MIN_SPLIT_TOKENS = 256  # shortest context slice worth its own program in split-KV
MAX_SPLITS = 16


@dataclass
class AttentionPlan:
    block_m: int
    num_splits: int
    tile_map: torch.Tensor | None  # [num_tiles, 2] int32 (request, first query row), or None


@dataclass
class TritonStepData:
    query_lens: list[int]
    max_query_len: int
    max_seq_len: int
    device: torch.device
    graph_tile_map: torch.Tensor | None = None  # a CUDA graph's static map (see the top)
    plans: dict[tuple[int, int, torch.dtype], AttentionPlan] = field(default_factory=dict)


def choose_block_m(max_query_len: int, group_pad: int, max_rows: int = MAX_BLOCK_M) -> int:
    """Rows per tile: enough for the longest query chunk's rows, in [16, max_rows]; never fewer
    than one token's GQA group."""
    rows = triton.next_power_of_2(max(1, max_query_len) * group_pad)
    return max(16, group_pad, min(rows, max_rows))


def choose_num_splits(num_programs: int, max_seq_len: int, num_sms: int) -> int:
    """Split-KV factor (a power of two) so that ~2 programs per SM are in flight.

    Splits only when the grid is below one program per SM and contexts are long enough that
    each slice keeps at least ``MIN_SPLIT_TOKENS`` positions.
    """
    if num_programs >= num_sms:
        return 1
    wanted = min(triton.cdiv(2 * num_sms, num_programs), max_seq_len // MIN_SPLIT_TOKENS,
                 MAX_SPLITS)
    return 1 if wanted < 2 else 1 << (wanted.bit_length() - 1)


def tile_limits(num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> tuple[int, int]:
    """(the GQA group padded to a power of two, the most rows a tile of ``dtype`` holds)."""
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    return group_pad, MAX_BLOCK_M_FP32 if dtype == torch.float32 else MAX_BLOCK_M


def graph_block_m(num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, query tokens) per tile in a CUDA graph of a step with prompt tokens: the tallest
    tile, whatever the step's longest chunk (the graph serves them all)."""
    group_pad, max_rows = tile_limits(num_heads, num_kv_heads, dtype)
    block_m = choose_block_m(1 << 30, group_pad, max_rows)
    return block_m, block_m // group_pad


def graph_num_tiles(max_reqs: int, num_tokens: int, block_q: int) -> int:
    """Tiles a graph of ``num_tokens`` tokens launches: enough for any step of at most that
    many tokens over at most ``max_reqs`` requests (each request's last tile may be partial)."""
    return max_reqs + triton.cdiv(num_tokens, block_q)


def fill_tile_map(query_lens: np.ndarray, block_q: int, num_tiles: int | None = None,
                  empty_req: int = 0) -> np.ndarray:
    """[num_tiles, 2] int32 on the host, (request, first query row): each request's query rows
    cut into tiles of ``block_q`` rows, then up to ``num_tiles`` (None: none) tiles of request
    ``empty_req`` (which has no query rows and no context, so its programs write nothing)."""
    counts = -(-query_lens // block_q)
    total = int(counts.sum())
    num_tiles = total if num_tiles is None else num_tiles
    if total > num_tiles:
        raise ValueError(f"{total} tiles do not fit a graph of {num_tiles}")
    tiles = np.zeros((num_tiles, 2), np.int32)
    tiles[:, 0] = empty_req
    tiles[:total, 0] = np.repeat(np.arange(len(query_lens)), counts)
    firsts = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    tiles[:total, 1] = firsts * block_q
    return tiles


def build_tile_map(query_lens: list[int], block_q: int, device: torch.device) -> torch.Tensor:
    """[num_tiles, 2] int32 on ``device``: each request's query rows cut into tiles of
    ``block_q`` rows (``fill_tile_map`` without padding)."""
    return to_device(fill_tile_map(np.asarray(query_lens, np.int64), block_q), device)


@functools.lru_cache(maxsize=8)
def device_num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # planning only; the interpreter has no SMs
    return torch.cuda.get_device_properties(device).multi_processor_count


class TritonAttentionBackend(AttentionBackend):
    """``num_splits``: None = heuristic, 1 = never split, k = always k slices (tests, tuning)."""

    name = "triton"

    def __init__(self, num_splits: int | None = None) -> None:
        self.num_splits = num_splits

    def prepare(self, metadata: AttentionMetadata, block_size: int) -> None:
        metadata.backend_data = TritonStepData(
            query_lens=list(metadata.query_lens_cpu), max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len, device=metadata.block_tables.device,
            graph_tile_map=metadata.tile_map)

    def plan(self, data: TritonStepData, num_heads: int, num_kv_heads: int,
             dtype: torch.dtype) -> AttentionPlan:
        key = (num_heads, num_kv_heads, dtype)
        if key not in data.plans and data.graph_tile_map is not None:
            # The graph's map was cut for the model's geometry; one tile shape, no split.
            block_m, _ = graph_block_m(num_heads, num_kv_heads, dtype)
            data.plans[key] = AttentionPlan(block_m, 1, data.graph_tile_map)
        if key not in data.plans:
            group_pad, max_rows = tile_limits(num_heads, num_kv_heads, dtype)
            block_m = choose_block_m(data.max_query_len, group_pad, max_rows)
            block_q = block_m // group_pad
            one_tile = data.max_query_len <= block_q
            tile_map = None if one_tile else build_tile_map(data.query_lens, block_q, data.device)
            num_tiles = len(data.query_lens) if tile_map is None else tile_map.shape[0]
            num_splits = self.num_splits or choose_num_splits(
                num_tiles * num_kv_heads, data.max_seq_len, device_num_sms(data.device))
            data.plans[key] = AttentionPlan(block_m, num_splits, tile_map)
        return data.plans[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float, *,
                sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                v_scale: float = 1.0) -> torch.Tensor:
        if not isinstance(metadata.backend_data, TritonStepData):
            raise RuntimeError("TritonAttentionBackend.prepare() was not called for this step")
        write_kv_triton(k, v, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        plan = self.plan(metadata.backend_data, q.shape[1], k.shape[1], q.dtype)
        return paged_attention_triton(
            q, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
            scale, block_m=plan.block_m, tile_map=plan.tile_map, num_splits=plan.num_splits,
            sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
