"""quantize_rows_triton stores the bytes and scales of quantize_rows_ref, the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.fp8_quant import quantize_rows_triton  # noqa: E402
from pagedllm.layers.quantization.fp8 import FP8_MAX, quantize_rows_ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 1000), (3, 2500), (2, 17000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_bytes(rows: int, cols: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * cols)
    # Rows of very different magnitudes, one all zero, strided (a slice of a wider matrix).
    x = torch.randn(rows, cols + 7, generator=gen) * torch.logspace(-3, 3, rows)[:, None]
    x[0] = 0.0 if rows > 1 else x[0]
    x = x.to(DEVICE, dtype)[:, :cols]
    q, scale = quantize_rows_triton(x)
    q_ref, scale_ref = quantize_rows_ref(x)
    if not x.is_cuda:
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        return
    # torch divides a CUDA tensor by a scalar as a product with its reciprocal: the scales
    # may differ in the last bit, and a value on a rounding boundary by one e4m3 step.
    torch.testing.assert_close(scale, scale_ref, rtol=2**-22, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=2**-3, atol=2**-9)


def test_reference_round_trip() -> None:
    """Each row's largest magnitude maps to 448; dequantized values are within half an e4m3
    step (2^-4 relative) of the input."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 10
    q, scale = quantize_rows_ref(x)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((4,), FP8_MAX))
    err = (q.float() * scale - x).abs()
    assert (err <= x.abs() * 2.0**-4 + scale * 2.0**-9).all()


def test_zero_rows_and_empty_input() -> None:
    q, scale = quantize_rows_triton(torch.zeros(2, 32, device=DEVICE))
    assert torch.equal(q.float(), torch.zeros(2, 32, device=DEVICE))
    assert (scale > 0).all()
    q, scale = quantize_rows_triton(torch.zeros(0, 32, device=DEVICE))
    assert q.shape == (0, 32) and scale.shape == (0, 1)
