"""Triton SiLU-and-mul: the gated MLP's ``silu(gate) * up`` in one pass over [T, 2I].

The reference (``F.silu(gate) * up``) runs two kernels and writes silu(gate) to memory in
between. Here each program reads one tile of gate and of up and writes the product. Rounding
follows the reference: silu is computed in fp32 as ``g / (1 + exp(-g))`` and rounded to the
input dtype, then the product is rounded again. The grid depends only on the token count, so
the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * INTER], last dim contiguous: gate then up
    out_ptr,  # [T, INTER] contiguous
    stride_xt,
    INTER: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    row = x_ptr + token * stride_xt
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    tl.store(out_ptr + token * INTER + cols, (silu * up).to(out_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I] = silu(x[:, :I]) * x[:, I:], a new tensor of x's dtype.

    x may have any row stride; its last dim must be contiguous. Never synchronizes.
    """
    num_tokens, width = x.shape
    if width % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul needs [T, 2I] with a contiguous last dim, got "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    inter = width // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, x.stride(0), INTER=inter, BLOCK=block, num_warps=max(1, block // 256),
        )
    return out
