"""write_kv_triton stores exactly what the torch reference write_kv stores, and nothing else."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.torch_backend import write_kv  # noqa: E402
from pagedllm.kernels.kv_cache_write import write_kv_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_slots(num_tokens: int, num_slots: int, num_padding: int,
                  gen: torch.Generator) -> torch.Tensor:
    """Distinct slots in random order, with ``num_padding`` of them replaced by -1."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:num_padding]] = -1
    return slots.to(DEVICE)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (3, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_matches_reference(block_size: int, num_kv_heads: int, head_dim: int,
                                 dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(block_size * 100 + num_kv_heads * 10 + head_dim)
    num_blocks, num_tokens = 6, 37
    # k and v are strided views of one fused projection, as a model produces them.
    fused = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k, v = fused[:, 1], fused[:, 2]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim,
                        generator=gen).to(DEVICE, dtype)
    slots = _random_slots(num_tokens, num_blocks * block_size, num_padding=5, gen=gen)
    expected = cache.clone()
    write_kv(k, v, expected, slots)
    write_kv_triton(k, v, cache, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def test_write_casts_to_cache_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(9, 2, 64, generator=gen).to(DEVICE) for _ in range(2))
    cache = torch.zeros(2, 2, 16, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.arange(9, device=DEVICE) * 3
    expected = cache.clone()
    write_kv(k, v, expected, slots)
    write_kv_triton(k, v, cache, slots)
    # On the GPU the cast rounds to nearest even, like torch; Triton's CPU interpreter truncates,
    # which may cost one bfloat16 ulp.
    ulp = 0.0 if DEVICE.type == "cuda" else 2.0**-7
    torch.testing.assert_close(cache, expected, rtol=ulp, atol=0)


def test_padding_only_step_writes_nothing() -> None:
    cache = torch.randn(2, 3, 16, 2, 64, device=DEVICE)
    before = cache.clone()
    k = torch.full((4, 2, 64), float("nan"), device=DEVICE)
    write_kv_triton(k, k, cache, torch.full((4,), -1, dtype=torch.long, device=DEVICE))
    write_kv_triton(k[:0], k[:0], cache, torch.empty(0, dtype=torch.long, device=DEVICE))
    torch.testing.assert_close(cache, before, rtol=0, atol=0)
