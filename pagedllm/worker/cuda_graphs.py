"""CUDA graphs for decode steps: one graph per padded batch size, replayed on static buffers.

A decode-only step of n requests runs the graph captured for the smallest size >= n. The
padding requests have no tokens to write (slot -1) and no context (seq_len 0), so they touch
nothing real; their rows of the output are ignored. Sampling runs after the graph, eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pagedllm.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class CUDAGraphRunner:
    def __init__(self, runner: ModelRunner, sizes: list[int], max_model_len: int) -> None:
        self.runner = runner
        self.sizes = sorted(sizes)
        self.max_model_len = max_model_len
        n, dev = self.sizes[-1], runner.device
        max_blocks = -(-max_model_len // runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        # M-RoPE models take [3, T] positions (temporal, height, width rows).
        rows = (3,) if runner.arch.mrope_section else ()
        self.positions = torch.zeros(*rows, n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, size: int) -> AttentionMetadata:
        # Planned for the longest context, so one graph serves every context length.
        return AttentionMetadata(
            num_tokens=size, slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], max_query_len=1,
            max_seq_len=self.max_model_len, query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_model_len] * size)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.mem_get_info()[0]
        for size in reversed(self.sizes):  # largest first: later graphs reuse its pool
            ids, pos = self.input_ids[:size], self.positions[..., :size]
            for _ in range(2):  # warm-up: Triton compiles, allocator settles
                self.runner.forward(ids, pos, self._metadata(size))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            metadata = self._metadata(size)
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self.runner.forward(ids, pos, metadata)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        used = before - torch.cuda.mem_get_info()[0]
        logger.info("Captured CUDA graphs for decode batch sizes %s in %.1f s (%.2f GiB)",
                    self.sizes, time.perf_counter() - start, used / 2**30)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        return (metadata.max_query_len == 1 and metadata.num_reqs <= self.sizes[-1]
                and metadata.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        n = metadata.num_reqs
        size = next(s for s in self.sizes if s >= n)
        width = metadata.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[..., :n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        self.seq_lens[n:size].zero_()
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:n]
