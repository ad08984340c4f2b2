"""SiLU-and-mul, the gate of the Llama-family MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers import dispatch


class SiluAndMul(nn.Module):
    """[T, 2I] -> [T, I] = silu(x[:, :I]) * x[:, I:]; one fused kernel on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x):
            from pagedllm.kernels.activation import silu_and_mul_triton

            return silu_and_mul_triton(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
