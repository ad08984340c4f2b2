"""CUDA graphs: one per padded decode batch size, and one per padded token count for steps with
prompt tokens; replayed on static buffers.

A decode-only step of n requests runs the graph captured for the smallest size >= n. The
padding requests have no tokens to write (slot -1) and no context (seq_len 0), so they touch
nothing real; their rows of the output are ignored.

A step with prompt tokens (a chunk beside decodes, or prompts alone) of T tokens over R requests
runs the graph of the smallest token count >= T, when there is one (``mixed_sizes``). Eagerly,
such a step launches ~10 kernels a layer from Python, and on a GPU that outruns the host the
launches, not the kernels, set its time. The graph takes any R up to ``max_reqs``: attention
reads a static tile map (``triton_backend.fill_tile_map``), sized for the worst case and padded
with tiles of an empty request (index ``max_reqs``: no query rows, no context). The padding
tokens write no KV (slot -1) and belong to no tile; their rows are computed (the dense layers
work row by row, so they touch no real row) and ignored.

Sampling runs after the graph, eagerly. Every graph shares one memory pool, captured largest
first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.distributed.parallel_state import tp_size
from pagedllm.worker.device_copy import to_device

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class _StaticInputs:
    """A graph family's inputs, sized for its largest graph."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor

    @classmethod
    def allocate(cls, runner: ModelRunner, tokens: int, reqs: int,
                 max_blocks: int) -> _StaticInputs:
        dev = runner.device
        rows = (3,) if runner.arch.mrope_section else ()  # M-RoPE: [3, T] positions
        return cls(torch.zeros(tokens, dtype=torch.int64, device=dev),
                   torch.zeros(*rows, tokens, dtype=torch.int64, device=dev),
                   torch.full((tokens,), -1, dtype=torch.int64, device=dev),
                   torch.arange(reqs + 1, dtype=torch.int32, device=dev),
                   torch.zeros(reqs, dtype=torch.int32, device=dev),
                   torch.zeros(reqs, max_blocks, dtype=torch.int32, device=dev))

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor,
             metadata: AttentionMetadata, size: int) -> None:
        """The step's real rows, then padding: no KV slot for tokens past the step's, no
        context for requests past its."""
        n = metadata.num_tokens
        self.input_ids[:n].copy_(input_ids)
        self.positions[..., :n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        reqs, width = metadata.num_reqs, metadata.block_tables.shape[1]
        self.seq_lens[:reqs].copy_(metadata.seq_lens)
        self.seq_lens[reqs:].zero_()  # padding requests: no context
        self.block_tables[:reqs, :width].copy_(metadata.block_tables)


class CUDAGraphRunner:
    def __init__(self, runner: ModelRunner, sizes: list[int], max_model_len: int,
                 mixed_sizes: list[int] | None = None, max_reqs: int = 0) -> None:
        self.runner = runner
        self.sizes = sorted(sizes)
        self.mixed_sizes = sorted(mixed_sizes or [])
        self.max_model_len = max_model_len
        self.max_reqs = max_reqs
        self.max_blocks = -(-max_model_len // runner.block_size)
        self.decode = _StaticInputs.allocate(runner, self.sizes[-1], self.sizes[-1],
                                             self.max_blocks)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.pool = None
        if self.mixed_sizes:
            from pagedllm.attention.triton_backend import graph_block_m, graph_num_tiles

            # One more request than any step has: the empty one the padding tiles point at.
            self.mixed = _StaticInputs.allocate(runner, self.mixed_sizes[-1], max_reqs + 1,
                                                self.max_blocks)
            # the tiles' height for this rank's heads (every layer has the same geometry)
            _, self.block_q = graph_block_m(runner.arch.num_heads // tp_size(),
                                            runner.num_kv_heads, runner.dtype)
            self.num_tiles = {size: graph_num_tiles(max_reqs, size, self.block_q)
                              for size in self.mixed_sizes}
            self.tile_map = torch.zeros(max(self.num_tiles.values()), 2, dtype=torch.int32,
                                        device=runner.device)

    def _decode_metadata(self, size: int) -> AttentionMetadata:
        # Planned for the longest context, so one graph serves every context length.
        d = self.decode
        return AttentionMetadata(
            num_tokens=size, slot_mapping=d.slot_mapping[:size],
            query_start_loc=d.query_start_loc[:size + 1], seq_lens=d.seq_lens[:size],
            block_tables=d.block_tables[:size], max_query_len=1,
            max_seq_len=self.max_model_len, query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_model_len] * size)

    def _mixed_metadata(self, size: int) -> AttentionMetadata:
        m, reqs = self.mixed, self.max_reqs + 1
        return AttentionMetadata(
            num_tokens=size, slot_mapping=m.slot_mapping[:size], query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens, block_tables=m.block_tables, max_query_len=size,
            max_seq_len=self.max_model_len, query_lens_cpu=[0] * reqs,
            seq_lens_cpu=[0] * reqs, tile_map=self.tile_map[:self.num_tiles[size]])

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.mem_get_info()[0]
        if self.mixed_sizes:  # the empty request: no rows (every start is 0), no context
            self.mixed.query_start_loc.zero_()
            self.tile_map[:, 0] = self.max_reqs
        jobs = [("mixed", s, self.mixed, self._mixed_metadata) for s in self.mixed_sizes] + \
            [("decode", s, self.decode, self._decode_metadata) for s in self.sizes]
        # largest first: later graphs reuse its pool
        for kind, size, inputs, metadata in sorted(jobs, key=lambda job: -job[1]):
            ids, pos = inputs.input_ids[:size], inputs.positions[..., :size]
            for _ in range(2):  # warm-up: Triton compiles, allocator settles
                self.runner.forward(ids, pos, metadata(size))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[kind, size] = self.runner.forward(ids, pos, metadata(size))
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[kind, size] = graph
        torch.cuda.synchronize()
        used = before - torch.cuda.mem_get_info()[0]
        logger.info("Captured CUDA graphs for decode batch sizes %s and steps with prompt "
                    "tokens of %s tokens in %.1f s (%.2f GiB)", self.sizes,
                    self.mixed_sizes or "no", time.perf_counter() - start, used / 2**30)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        """Whether a captured graph serves this step (a decode graph or a mixed one)."""
        if metadata.block_tables.shape[1] > self.max_blocks:
            return False
        if metadata.max_query_len == 1:
            return metadata.num_reqs <= self.sizes[-1]
        return bool(self.mixed_sizes) and metadata.num_tokens <= self.mixed_sizes[-1] \
            and metadata.num_reqs <= self.max_reqs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        if metadata.max_query_len == 1:
            n = metadata.num_reqs
            size = next(s for s in self.sizes if s >= n)
            self.decode.load(input_ids, positions, metadata, size)
            key = ("decode", size)
        else:
            size = next(s for s in self.mixed_sizes if s >= metadata.num_tokens)
            self._load_mixed(input_ids, positions, metadata, size)
            key = ("mixed", size)
        self.graphs[key].replay()
        return self.outputs[key][:metadata.num_tokens]

    def _load_mixed(self, input_ids: torch.Tensor, positions: torch.Tensor,
                    metadata: AttentionMetadata, size: int) -> None:
        from pagedllm.attention.triton_backend import fill_tile_map

        m, reqs = self.mixed, metadata.num_reqs
        m.load(input_ids, positions, metadata, size)
        m.query_start_loc[:reqs + 1].copy_(metadata.query_start_loc)
        m.query_start_loc[reqs + 1:].fill_(metadata.num_tokens)  # later requests: no rows
        tiles = fill_tile_map(np.asarray(metadata.query_lens_cpu, np.int64), self.block_q,
                              self.num_tiles[size], self.max_reqs)
        self.tile_map[:len(tiles)].copy_(to_device(tiles, self.runner.device))
