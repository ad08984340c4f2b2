"""The attention backend interface: what model code calls, and the per-step metadata it reads.

Layout shared by every backend (the CPU reference and the Triton kernels):

- one KV cache tensor per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
  (index 0 = keys, 1 = values);
- token ``i`` of the step is written to slot ``slot_mapping[i]`` (``block * block_size + offset``;
  ``-1`` = padding, not written);
- the step's tokens are grouped by request: request ``r`` owns query rows
  ``query_start_loc[r]:query_start_loc[r+1]``, and after this step has ``seq_lens[r]`` tokens in
  the cache (its cached prefix plus the new ones), stored in blocks ``block_tables[r]``.
  The new tokens are the last ones, so query row ``j`` of request ``r`` sits at position
  ``seq_lens[r] - query_len + j`` and attends causally to positions ``<=`` that.

Two per-layer options change what a query sees, as transformers applies them: a sliding window
``w > 0`` limits the query at position ``p`` to keys at positions in ``(p - w, p]`` (Mistral,
Gemma 2's every other layer), and a logit soft-cap ``c > 0`` replaces each scaled score ``s`` by
``c * tanh(s / c)`` before the softmax (Gemma 2). 0 turns either off.

An FP8 cache (``--kv-cache-dtype fp8``: float8_e4m3fn, one byte per value) holds
``fp8(clamp(k / k_scale, -448, 448))`` and is read as ``fp8 * k_scale`` (likewise v), with one
per-tensor scale per layer as vLLM (1.0 unless calibrated); every backend does this arithmetic.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Per-step inputs of attention, built once by the model runner, read by every layer."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that plan on the CPU (never read in a captured graph).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    backend_data: Any = None  # whatever the chosen backend precomputes once per step
    # A CUDA graph of a step with prompt tokens fills this static tile map ([tiles, 2] int32,
    # padded with tiles of an empty request) instead of the backend building one per step.
    tile_map: torch.Tensor | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def query_starts_cpu(self) -> list[int]:
        """Host copy of ``query_start_loc``."""
        return list(itertools.accumulate(self.query_lens_cpu, initial=0))


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache and attends over it."""

    name: str

    def prepare(self, metadata: AttentionMetadata, block_size: int) -> None:
        """Precomputes per-step data shared by all layers (stored in ``backend_data``)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float, *,
                sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                v_scale: float = 1.0) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

        Writes k, v at ``slot_mapping`` and returns [num_tokens, num_heads, head_dim].
        ``sliding_window`` and ``softcap``: the layer's options (module docstring; 0 = off).
        ``k_scale``, ``v_scale``: an FP8 cache (float8_e4m3fn) stores k / k_scale and
        v / v_scale and reads back fp8 * scale (module docstring); other caches ignore them.
        """


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]
    backend: AttentionBackend


_context: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Scopes one step's attention metadata and KV caches to one model forward."""
    global _context
    previous, _context = _context, ctx
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention called outside forward_context()")
    return _context


def get_attention_backend(name: str) -> AttentionBackend:
    """Backends are imported only when chosen, so the CPU path never imports Triton."""
    if name == "torch":
        from pagedllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from pagedllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (choose 'torch' or 'triton')")
