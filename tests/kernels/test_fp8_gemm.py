"""fp8_weight_gemm_triton (the decode path of --quantization fp8) equals its torch reference:
x times the dequantized FP8 weight, with and without split-K and bias."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.fp8_gemm import Tiles, choose_tiles, fp8_weight_gemm_triton  # noqa: E402
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


@pytest.mark.parametrize("rows,n,k,tiles,dtype,with_bias", [
    (1, 96, 256, Tiles(64, 256, 1), torch.bfloat16, False),
    (3, 64, 1024, Tiles(32, 512, 2), torch.float16, True),  # two slices of one BLOCK_K each
    (16, 80, 600, Tiles(64, 256, 3), torch.float32, True),  # ragged N and K, 3 slices
    (2, 48, 700, Tiles(32, 512, 1), torch.float32, False),  # a ragged last K tile
    (5, 128, 2048, None, torch.bfloat16, True),  # the heuristic's tiles (a split here)
])
def test_matches_reference(rows: int, n: int, k: int, tiles: Tiles | None,
                           dtype: torch.dtype, with_bias: bool) -> None:
    x, w, scale, bias = operands(rows, n, k, dtype, seed=rows + n)
    bias = bias if with_bias else None
    out = fp8_weight_gemm_triton(x, w, scale, bias, tiles=tiles)
    expected = fp8_weight_linear_ref(x, w, scale, bias)
    assert out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,k,tiles,gemv", [
    (96, 256, Tiles(32, 256, 1), True),
    (80, 600, Tiles(16, 128, 3), True),  # ragged N and K, 3 slices
    (40, 1024, Tiles(8, 256, 4, 8, 2), True),  # even K, 4 slices
    (96, 256, Tiles(32, 256, 1), False),  # one row through the MMA kernel
])
def test_one_row_matches_reference(n: int, k: int, tiles: Tiles, gemv: bool) -> None:
    x, w, scale, bias = operands(1, n, k, torch.bfloat16, seed=n + k)
    out = fp8_weight_gemm_triton(x, w, scale, bias, tiles=tiles, gemv=gemv)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out.float(), fp8_weight_linear_ref(x, w, scale, bias).float(),
                               rtol=tol, atol=tol)


def test_linear_takes_it_for_few_tokens_on_a_gpu(monkeypatch) -> None:
    """fp8_linear sends at most SMALL_M rows here (GPU tensors; patched for the CPU)."""
    from pagedllm.layers import dispatch

    monkeypatch.setattr(dispatch, "use_triton", lambda x: True)
    x, w, scale, bias = operands(4, 64, 256, torch.float32, seed=0)
    out = fp8_linear(x.reshape(2, 2, 256), w, scale, bias)
    assert out.shape == (2, 2, 64)
    torch.testing.assert_close(out.reshape(4, 64), fp8_weight_linear_ref(x, w, scale, bias),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,n,k", [(1, 40, 300), (1, 24, 2048), (3, 40, 2048), (2, 48, 96)])
def test_chosen_tiles_match_reference(rows: int, n: int, k: int) -> None:
    """The default tiles (``choose_tiles``) on ragged shapes, with and without a split."""
    tiles = choose_tiles(n, k, rows == 1)
    if rows == 1:  # the GEMV keeps at most 64 partial sums a thread
        assert tiles.block_n * tiles.block_k <= 64 * 32 * tiles.num_warps
    x, w, scale, bias = operands(rows, n, k, torch.bfloat16, seed=rows * k)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(fp8_weight_gemm_triton(x, w, scale, bias).float(),
                               fp8_weight_linear_ref(x, w, scale, bias).float(),
                               rtol=tol, atol=tol)


def test_too_many_rows_is_an_error() -> None:
    x, w, scale, _ = operands(17, 64, 256, torch.float32, seed=1)
    with pytest.raises(ValueError, match="at most 16"):
        fp8_weight_gemm_triton(x, w, scale)
