"""fp8_weight_gemm_triton (the decode path of --quantization fp8) equals its torch reference:
x times the dequantized FP8 weight, with and without split-K and bias."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.fp8_gemm import choose_split_k, fp8_weight_gemm_triton  # noqa: E402
from pagedllm.layers.quantization.fp8 import (  # noqa: E402
    fp8_linear,
    fp8_weight_linear_ref,
    quantize_rows_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def operands(rows: int, n: int, k: int, dtype: torch.dtype, seed: int):  # noqa: ANN201
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k + 8, generator=gen)[:, :k].to(DEVICE, dtype)  # strided rows
    w, scale = quantize_rows_ref(torch.randn(n, k, generator=gen) * 0.1)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    return x, w.to(DEVICE), scale.reshape(1, -1).to(DEVICE), bias


@pytest.mark.parametrize("rows,n,k,split_k,dtype,with_bias", [
    (1, 96, 256, 1, torch.bfloat16, False),
    (3, 64, 512, 2, torch.float16, True),  # two slices of one BLOCK_K each
    (16, 80, 600, 3, torch.float32, True),  # ragged N and K, a split count not a power of two
    (5, 128, 1024, None, torch.bfloat16, True),  # the heuristic's split
])
def test_matches_reference(rows: int, n: int, k: int, split_k: int | None, dtype: torch.dtype,
                           with_bias: bool) -> None:
    x, w, scale, bias = operands(rows, n, k, dtype, seed=rows + n)
    bias = bias if with_bias else None
    out = fp8_weight_gemm_triton(x, w, scale, bias, split_k=split_k)
    expected = fp8_weight_linear_ref(x, w, scale, bias)
    assert out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def test_linear_takes_it_for_few_tokens_on_a_gpu(monkeypatch) -> None:
    """fp8_linear sends at most SMALL_M rows here (GPU tensors; patched for the CPU)."""
    from pagedllm.layers import dispatch

    monkeypatch.setattr(dispatch, "use_triton", lambda x: True)
    x, w, scale, bias = operands(4, 64, 256, torch.float32, seed=0)
    out = fp8_linear(x.reshape(2, 2, 256), w, scale, bias)
    assert out.shape == (2, 2, 64)
    torch.testing.assert_close(out.reshape(4, 64), fp8_weight_linear_ref(x, w, scale, bias),
                               rtol=1e-4, atol=1e-4)


def test_split_heuristic_fills_the_gpu() -> None:
    assert choose_split_k(4096, 4096, 132) == 4  # 64 channel blocks -> 256 programs
    assert choose_split_k(28672, 4096, 132) == 1  # 448 blocks already
    assert choose_split_k(4096, 14336, 132) == 4
    assert choose_split_k(64, 256, 132) == 1  # one BLOCK_K: nothing to split


def test_too_many_rows_is_an_error() -> None:
    x, w, scale, _ = operands(17, 64, 256, torch.float32, seed=1)
    with pytest.raises(ValueError, match="at most 16"):
        fp8_weight_gemm_triton(x, w, scale)
