"""fp8_weight_gemm_triton (the decode path of --quantization fp8) equals its torch reference:
x times the dequantized FP8 weight, with and without split-K and bias."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.fp8_gemm import choose_tiles, fp8_weight_gemm_triton  # noqa: E402
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
    (1, 96, 256, (64, 256, 1), torch.bfloat16, False),
    (3, 64, 1024, (32, 512, 2), torch.float16, True),  # two slices of one BLOCK_K each
    (16, 80, 600, (64, 256, 3), torch.float32, True),  # ragged N and K, 3 slices
    (2, 48, 700, (32, 512, 1), torch.float32, False),  # a ragged last K tile
    (5, 128, 2048, None, torch.bfloat16, True),  # the heuristic's tiles (a split here)
])
def test_matches_reference(rows: int, n: int, k: int, tiles: tuple[int, int, int] | None,
                           dtype: torch.dtype, with_bias: bool) -> None:
    x, w, scale, bias = operands(rows, n, k, dtype, seed=rows + n)
    bias = bias if with_bias else None
    out = fp8_weight_gemm_triton(x, w, scale, bias, tiles=tiles)
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


def test_tiles_give_every_sm_a_program() -> None:
    """Llama-3.1-8B's layers on 132 SMs need no split; Qwen3-0.6B's narrow ones do."""
    assert choose_tiles(28672, 4096, 132) == (64, 256, 1)  # gate_up: 448 programs
    assert choose_tiles(6144, 4096, 132) == (32, 512, 1)  # qkv: 192
    assert choose_tiles(4096, 14336, 132) == (32, 512, 1)  # down: 128 (of 132)
    assert choose_tiles(1024, 3072, 132) == (32, 512, 4)  # 32 programs x 4 slices
    assert choose_tiles(64, 512, 132) == (32, 512, 1)  # one BLOCK_K: nothing to split


def test_too_many_rows_is_an_error() -> None:
    x, w, scale, _ = operands(17, 64, 256, torch.float32, seed=1)
    with pytest.raises(ValueError, match="at most 16"):
        fp8_weight_gemm_triton(x, w, scale)
