"""Triton SiLU-and-mul: the gated MLP's ``silu(gate) * up`` in one pass over [T, 2I].

The reference (``F.silu(gate) * up``) runs two kernels and writes silu(gate) to memory in
between. Here each program reads one tile of gate and of up and writes the product. Rounding
follows the reference: silu is computed in fp32 as ``g / (1 + exp(-g))`` and rounded to the
input dtype, then the product is rounded again. The grid depends only on the token count, so
the launch is CUDA-graph capturable.

Before an FP8 product (``--quantization fp8``: the MLP's down projection), one program takes a
whole row and quantizes it per token in its epilogue (``fp8_quant.quantize_block``): the bytes
and scale ``quantize_rows`` would store from the plain output, without its launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.fp8_quant import ONE_PASS_COLS, quantize_block
from pagedllm.layers.quantization.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX, Fp8Rows

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * INTER], last dim contiguous: gate then up
    out_ptr,  # [T, INTER] contiguous
    scale_ptr,  # [T] fp32, written when FP8_OUT (out_ptr is then float8e4nv)
    stride_xt, fp8_max, min_scale,
    INTER: tl.constexpr, BLOCK: tl.constexpr, FP8_OUT: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    row = x_ptr + token * stride_xt
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    if FP8_OUT:  # BLOCK covers the row (one program per token)
        q, scale = quantize_block((silu * up).to(dtype).to(tl.float32)[None, :], fp8_max,
                                  min_scale)
        tl.store(scale_ptr + token + tl.arange(0, 1), scale)
        tl.store(out_ptr + token * INTER + cols[None, :],
                 q.to(out_ptr.dtype.element_ty), mask=mask[None, :])
    else:
        tl.store(out_ptr + token * INTER + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """[T, 2I] -> [T, I] = silu(x[:, :I]) * x[:, I:], a new tensor of x's dtype, or with
    ``fp8`` its rows quantized per token (I at most ``ONE_PASS_COLS``).

    x may have any row stride; its last dim must be contiguous. Never synchronizes.
    """
    num_tokens, width = x.shape
    if width % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul needs [T, 2I] with a contiguous last dim, got "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    inter = width // 2
    if fp8 and inter > ONE_PASS_COLS:
        raise ValueError(f"an FP8 output holds a row of at most {ONE_PASS_COLS} values")
    out = torch.empty(num_tokens, inter, dtype=FP8_DTYPE if fp8 else x.dtype, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device) if fp8 else out
    if num_tokens:
        block = triton.next_power_of_2(inter) if fp8 else min(_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, scale, x.stride(0), FP8_MAX, _MIN_SCALE, INTER=inter, BLOCK=block,
            FP8_OUT=fp8, num_warps=min(16, max(1, block // 256)),
        )
    return Fp8Rows(out, scale, x.dtype) if fp8 else out
