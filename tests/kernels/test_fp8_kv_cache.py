"""An FP8 KV cache (--kv-cache-dtype fp8): the Triton write stores the reference's bytes
(k / k_scale, saturated at 448), and the Triton and CPU attention equal paged_attention_ref's
dequantized attention on random mixed and decode steps."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.torch_backend import (  # noqa: E402
    TorchAttentionBackend,
    paged_attention_ref,
    write_kv,
)
from pagedllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedllm.kernels.kv_cache_write import write_kv_triton  # noqa: E402
from pagedllm.kernels.paged_attention import AttentionTiles  # noqa: E402
from pagedllm.layers.quantization.fp8 import FP8_DTYPE, quantize  # noqa: E402
from tests.kernels.test_paged_attention import (  # noqa: E402
    DECODES,
    MIXED,
    Step,
    assert_matches,
    make_step,
    run_kernel,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K_SCALE, V_SCALE = 0.05, 0.02  # small scales: values of a few units saturate at 448


def test_write_stores_the_references_bytes() -> None:
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(29, 3, 2, 64, generator=gen).to(DEVICE, torch.bfloat16) * 8
    k, v = fused[:, 1], fused[:, 2]  # strided views, some values past 448 * scale
    cache = torch.zeros(2, 4, 16, 2, 64, device=DEVICE).to(FP8_DTYPE)
    slots = torch.randperm(64, generator=gen)[:29].to(DEVICE)
    slots[::7] = -1
    expected = cache.clone()
    write_kv(k, v, expected, slots, k_scale=K_SCALE, v_scale=V_SCALE)
    write_kv_triton(k, v, cache, slots, K_SCALE, V_SCALE)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    flat = expected.view(2, -1, 2, 64)
    real = slots >= 0
    assert torch.equal(flat[0, slots[real]].view(torch.uint8),
                       quantize(k[real], K_SCALE).view(torch.uint8))
    assert flat.float().abs().max() == 448.0  # saturated, not inf or NaN


def fp8_step(reqs: list[tuple[int, int]], dtype: torch.dtype, seed: int, **kw: int) -> Step:
    """A step whose cached prefixes are FP8 (NaN where no request may read stays NaN)."""
    step = make_step(reqs, dtype=dtype, seed=seed, **kw)
    step.kv_cache = quantize(step.kv_cache, 0.01)  # prefixes of magnitude ~100 as stored
    return step


def fp8_reference(step: Step, scale: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    cache = step.kv_cache.clone()
    write_kv(step.k, step.v, cache, step.metadata.slot_mapping, k_scale=K_SCALE,
             v_scale=V_SCALE)
    out = paged_attention_ref(step.q, cache, step.metadata, scale, k_scale=K_SCALE,
                              v_scale=V_SCALE, **options)
    return cache, out[:step.num_real_tokens]


@pytest.mark.parametrize("dtype,num_splits,group,options", [
    (torch.bfloat16, 1, 4, {}),
    (torch.float16, 2, 2, {"sliding_window": 16}),
    (torch.float32, 1, 1, {"softcap": 3.0}),
])
def test_mixed_step_matches_reference(dtype: torch.dtype, num_splits: int, group: int,
                                      options: dict) -> None:
    step = fp8_step(MIXED + [(0, 0)], dtype, seed=group, block_size=16, group=group,
                    head_dim=64, pad_tokens=2)
    cache, expected = fp8_reference(step, 0.125, **options)
    out = run_kernel(step, cache, 0.125, block_m=16 if dtype == torch.float32 else 64,
                     num_splits=num_splits, one_tile_per_req=False, k_scale=K_SCALE,
                     v_scale=V_SCALE, **options)
    assert_matches(out, expected)


@pytest.mark.parametrize("num_splits,fp16_dot", [(1, True), (4, True), (1, False)])
def test_padded_decode_step_matches_reference(num_splits: int, fp16_dot: bool) -> None:
    """Both products of an FP8 cache under bf16 queries: in fp16 (the default) and in bf16."""
    step = fp8_step(DECODES, torch.bfloat16, seed=3, block_size=32, group=8, head_dim=128,
                    pad_tokens=2)
    cache, expected = fp8_reference(step, 0.09)
    tiles = AttentionTiles(128, 4, 3, fp16_dot=fp16_dot)
    out = run_kernel(step, cache, 0.09, block_m=16, num_splits=num_splits,
                     one_tile_per_req=True, k_scale=K_SCALE, v_scale=V_SCALE, tiles=tiles)
    assert_matches(out, expected)


@pytest.mark.parametrize("backend", [TritonAttentionBackend(), TorchAttentionBackend()])
def test_backends_write_and_attend(backend) -> None:
    reqs = [(40, 50), (1, 20), (3, 9), (1, 33)]
    step = fp8_step(reqs, torch.bfloat16, seed=5, block_size=16, group=4, head_dim=64)
    expected_cache, expected = fp8_reference(step, 0.125)
    cache = step.kv_cache
    if isinstance(backend, TorchAttentionBackend):  # block tails hold zeros in the engine
        cache = cache.float().nan_to_num(0.0).to(FP8_DTYPE)
        expected_cache = expected_cache.float().nan_to_num(0.0).to(FP8_DTYPE)
    backend.prepare(step.metadata, block_size=16)
    out = backend.forward(step.q, step.k, step.v, cache, step.metadata, 0.125,
                          k_scale=K_SCALE, v_scale=V_SCALE)
    assert_matches(out[:step.num_real_tokens], expected)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))


def test_fp8_cache_changes_the_result_only_by_its_rounding() -> None:
    """The same step over a bf16 cache and over an FP8 cache with scale 1: close, not equal."""
    step = make_step(MIXED, block_size=16, group=2, head_dim=64, dtype=torch.float32, seed=9)
    cache = step.kv_cache.clone()
    write_kv(step.k, step.v, cache, step.metadata.slot_mapping)
    exact = paged_attention_ref(step.q, cache, step.metadata, 0.125)
    rounded = paged_attention_ref(step.q, quantize(cache, 1.0), step.metadata, 0.125)
    real = slice(0, step.num_real_tokens)
    err = (rounded[real] - exact[real]).abs()
    # outputs of magnitude ~0.5; e4m3 rounds each cached value by up to 2^-4 of it
    assert 0 < err.mean().item() < 0.02 and err.max().item() < 0.25
