"""The CPU backend's batch-1 decode path (one request, one token) equals the reference.

The path reads a request's K/V in place when its blocks are consecutive and gathers them
otherwise, slices to the window and attends without a mask; every option the reference has
(window, soft-cap, an FP8 cache, bfloat16) is checked on random data.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.torch_backend import TorchAttentionBackend, paged_attention_ref, write_kv
from pagedllm.layers.quantization.fp8 import FP8_DTYPE

BLOCK = 16
KV_HEADS, GROUP, HEAD_DIM = 2, 3, 32


def decode_step(seq_len: int, consecutive: bool, seed: int, dtype: torch.dtype = torch.float32,
                cache_dtype: torch.dtype | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           AttentionMetadata]:
    """q, k, v of the token at position seq_len - 1, a cache holding the positions before it
    (zeros elsewhere, as the engine keeps them) and the step's metadata."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-seq_len // BLOCK)
    num_blocks = width + 6
    picked = (torch.randperm(num_blocks - 1, generator=gen)[:width] + 1).tolist()
    blocks = list(range(3, 3 + width)) if consecutive else sorted(picked, reverse=True)
    cache = torch.zeros(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    flat = cache.view(2, -1, KV_HEADS, HEAD_DIM)
    slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len)]
    flat[:, slots[:-1]] = torch.randn(2, seq_len - 1, KV_HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(1, KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype)
    k, v = torch.randn(2, 1, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    metadata = AttentionMetadata(
        num_tokens=1, slot_mapping=torch.tensor(slots[-1:]),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=torch.tensor([blocks + [0, 0]], dtype=torch.int32), max_query_len=1,
        max_seq_len=seq_len, query_lens_cpu=[1], seq_lens_cpu=[seq_len])
    return q, k, v, cache.to(cache_dtype or dtype), metadata


def expected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
             metadata: AttentionMetadata, **options: float) -> tuple[torch.Tensor, torch.Tensor]:
    cache = cache.clone()
    fp8 = {key: options[key] for key in ("k_scale", "v_scale") if key in options}
    write_kv(k, v, cache, metadata.slot_mapping, **fp8)
    return cache, paged_attention_ref(q, cache, metadata, 0.125, **options)


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 40, 64])
@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (20, 0.0), (0, 5.0)])
def test_single_decode_matches_reference(seq_len: int, consecutive: bool, window: int,
                                         softcap: float) -> None:
    q, k, v, cache, metadata = decode_step(seq_len, consecutive, seed=seq_len + window)
    want_cache, want = expected(q, k, v, cache, metadata, sliding_window=window,
                                softcap=softcap)
    backend = TorchAttentionBackend()
    backend.prepare(metadata, BLOCK)
    plan = metadata.backend_data.single
    assert plan is not None
    assert (plan.first_block is not None) == (consecutive or seq_len <= BLOCK)  # read in place
    for _ in range(2):  # two layers share the step's plan
        out = backend.forward(q, k, v, cache, metadata, 0.125, sliding_window=window,
                              softcap=softcap)
        torch.testing.assert_close(out, want)
    torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)


def test_single_decode_clears_a_fresh_block_before_writing() -> None:
    q, k, v, cache, metadata = decode_step(17, consecutive=False, seed=1)
    fresh = metadata.block_tables[0, 1]
    cache[:, fresh] = float("nan")  # stale memory: the token starts this block
    backend = TorchAttentionBackend()
    backend.prepare(metadata, BLOCK)
    out = backend.forward(q, k, v, cache, metadata, 0.125)
    assert torch.isfinite(out).all()
    assert (cache[:, fresh, 1:] == 0).all()


@pytest.mark.parametrize("dtype,cache_dtype,tol", [
    (torch.bfloat16, torch.bfloat16, 2e-2), (torch.float32, FP8_DTYPE, 1e-5)])
def test_single_decode_other_dtypes(dtype: torch.dtype, cache_dtype: torch.dtype,
                                    tol: float) -> None:
    q, k, v, cache, metadata = decode_step(40, consecutive=False, seed=3, dtype=dtype,
                                           cache_dtype=cache_dtype)
    scales = {"k_scale": 0.5, "v_scale": 2.0} if cache_dtype == FP8_DTYPE else {}
    _, want = expected(q, k, v, cache, metadata, **scales)
    backend = TorchAttentionBackend()
    backend.prepare(metadata, BLOCK)
    out = backend.forward(q, k, v, cache, metadata, 0.125, **scales)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)


def test_other_steps_keep_the_batched_path() -> None:
    q, k, v, cache, metadata = decode_step(20, consecutive=True, seed=4)
    metadata.slot_mapping = torch.tensor([-1])  # a padding token: not a batch-1 decode
    TorchAttentionBackend().prepare(metadata, BLOCK)
    assert metadata.backend_data.single is None
