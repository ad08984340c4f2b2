"""--quantization fp8: the scaled product equals its dequantized definition; layers quantized at
load stay close to the model dtype; FP8 checkpoint tensors (per-tensor scales of merged pieces,
per-channel scales, tensor-parallel shards) load into the same per-channel layout."""

from __future__ import annotations

import pytest
import torch

import pagedllm.layers.linear as linear_module
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.quantization import METHODS, create_quantized_weights, quantize_model
from pagedllm.layers.quantization.fp8 import (
    FP8_DTYPE,
    fp8_linear,
    fp8_linear_ref,
    quantize,
    quantize_rows,
    quantize_rows_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_matches_dequantized_product(dtype: torch.dtype, with_bias: bool) -> None:
    # [..., K] with leading dims; more rows than SMALL_M, which on a GPU take the weight-only
    # kernel (its own test: tests/kernels/test_fp8_gemm.py)
    x = torch.randn(3, 7, 64, generator=_gen(0)).to(DEVICE, dtype)
    w, w_scale = quantize_rows_ref(torch.randn(48, 64, generator=_gen(1)).to(DEVICE))
    bias = torch.randn(48, generator=_gen(2)).to(DEVICE, dtype) if with_bias else None
    out = fp8_linear(x, w, w_scale.reshape(1, -1), bias)
    expected = fp8_linear_ref(x, w, w_scale.reshape(1, -1), bias)
    if x.is_cuda:
        # The kernel's quantized activations (the quantizer's own test: test_fp8_quant.py): its
        # scale may differ from torch's in the last bit, and a bf16 value on a rounding
        # boundary then lands one e4m3 step away.
        xq, x_scale = quantize_rows(x.reshape(-1, 64))
        exact = (xq.float() * x_scale) @ (w.float() * w_scale).t()
        expected = (exact + (0 if bias is None else bias.float())).to(dtype).reshape(3, 7, 48)
    assert out.shape == (3, 7, 48) and out.dtype == dtype
    # accumulation order; on CUDA the product is rounded to bf16 (cuBLAS's row-wise output), as
    # is a bf16 result: a bf16 step (2^-7 relative) apart at most
    tol = 1e-5 if dtype == torch.float32 and not x.is_cuda else 1e-2
    rtol = 2**-7 if dtype == torch.bfloat16 or x.is_cuda else tol
    torch.testing.assert_close(out, expected, rtol=rtol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layers_stay_close(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(ColumnParallelLinear(64, [32, 16], bias=True),
                                RowParallelLinear(48, 64)).to(DEVICE, dtype)
    x = torch.randn(7, 64, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
        expected = model(x).float()
        quantize_model(model, "fp8")
        out = model(x).float()
    assert model[0].weight.dtype == FP8_DTYPE and model[0].weight_scale.shape == (1, 48)
    # e4m3 keeps 3 mantissa bits: each operand off by up to 2^-4 (about 4% RMS for x and w).
    assert ((out - expected).norm() / expected.norm()).item() < 0.1


def _fp8_column_layer(scales: list[torch.Tensor], weights: list[torch.Tensor]
                      ) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(32, [w.shape[0] for w in weights])
    create_quantized_weights(torch.nn.Sequential(layer), "fp8")
    for shard, (w, s) in enumerate(zip(weights, scales)):
        layer.weight.weight_loader(layer.weight, w, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, s, shard)
    METHODS["fp8"]().process_weights_after_loading(layer)
    return layer


def test_checkpoint_per_tensor_scales_of_merged_pieces() -> None:
    """q, k, v each with their own per-tensor scale: kept exactly, as per-channel scales."""
    pieces = [torch.randn(n, 32, generator=_gen(n)) * (n / 8) for n in (16, 8, 8)]
    scales = [p.abs().amax() / 448 for p in pieces]
    stored = [quantize(p, s) for p, s in zip(pieces, scales)]
    layer = _fp8_column_layer([s.reshape(()) for s in scales], stored)
    assert torch.equal(layer.weight.view(torch.uint8), torch.cat(stored).view(torch.uint8))
    expected = torch.cat([s.expand(len(p)) for p, s in zip(pieces, scales)])
    torch.testing.assert_close(layer.weight_scale[0], expected, rtol=0, atol=0)


def test_checkpoint_per_channel_scales_follow_tensor_parallel_rows(monkeypatch) -> None:
    """Rank 1 of 2: each piece's second half of rows, with those rows' scales; a row-parallel
    layer keeps every output row's scale."""
    monkeypatch.setattr(linear_module, "tp_rank", lambda: 1)
    monkeypatch.setattr(linear_module, "tp_size", lambda: 2)
    pieces = [torch.randn(n, 32, generator=_gen(n)) for n in (16, 8)]
    quantized = [quantize_rows_ref(p) for p in pieces]
    layer = _fp8_column_layer([s for _, s in quantized], [q for q, _ in quantized])
    expected = torch.cat([s[len(s) // 2:, 0] for _, s in quantized])
    torch.testing.assert_close(layer.weight_scale[0], expected, rtol=0, atol=0)
    row = RowParallelLinear(64, 16)
    create_quantized_weights(torch.nn.Sequential(row), "fp8")
    q, s = quantize_rows_ref(torch.randn(16, 64, generator=_gen(3)))
    row.weight.weight_loader(row.weight, q)
    row.weight_scale.weight_loader(row.weight_scale, s)  # [16, 1], as compressed-tensors
    assert torch.equal(row.weight.view(torch.uint8), q[:, 32:].view(torch.uint8))
    torch.testing.assert_close(row.weight_scale.data, s[:, 0], rtol=0, atol=0)


def test_missing_checkpoint_scale_is_an_error() -> None:
    layer = ColumnParallelLinear(32, [16])
    create_quantized_weights(torch.nn.Sequential(layer), "fp8")
    layer.weight.weight_loader(layer.weight, torch.zeros(16, 32, dtype=FP8_DTYPE))
    with pytest.raises(ValueError, match="no weight_scale"):
        METHODS["fp8"]().process_weights_after_loading(layer)
