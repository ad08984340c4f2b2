"""Gated activations of the decoder MLP: SiLU (Llama family), GELU-tanh (Gemma)."""

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


class GeluTanhAndMul(nn.Module):
    """[T, 2I] -> [T, I] = gelu_tanh(x[:, :I]) * x[:, I:] (Gemma's ``gelu_pytorch_tanh``); torch
    on every device (no fused kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_GATED: dict[str, type[nn.Module]] = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def gated_activation(name: str) -> nn.Module:
    """The module for a config's ``hidden_act`` / ``hidden_activation``."""
    if name not in _GATED:
        raise ValueError(f"MLP activation {name!r} is not supported; pagedllm supports "
                         f"{', '.join(_GATED)}.")
    return _GATED[name]()
