"""Gated activations of the decoder MLP: SiLU (Llama family), GELU-tanh (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers import dispatch
from pagedllm.layers.quantization.fp8 import Fp8Rows, fp8_rows


class GatedActivation(nn.Module):
    """[T, 2I] -> [T, I] = act(x[:, :I]) * x[:, I:]."""

    def quantized(self, x: torch.Tensor) -> Fp8Rows:
        """The output's rows quantized per token, for the FP8 product they feed."""
        return fp8_rows(self(x))


class SiluAndMul(GatedActivation):
    """silu(gate) * up; one fused kernel on CUDA, which also quantizes for an FP8 product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x):
            from pagedllm.kernels.activation import silu_and_mul_triton

            return silu_and_mul_triton(x)  # type: ignore[return-value]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def quantized(self, x: torch.Tensor) -> Fp8Rows:
        if dispatch.use_triton(x):
            from pagedllm.kernels.activation import silu_and_mul_triton

            return silu_and_mul_triton(x, fp8=True)  # type: ignore[return-value]
        return super().quantized(x)


class GeluTanhAndMul(GatedActivation):
    """gelu_tanh(gate) * up (Gemma's ``gelu_pytorch_tanh``); torch on every device (no fused
    kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_GATED: dict[str, type[GatedActivation]] = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def gated_activation(name: str) -> GatedActivation:
    """The module for a config's ``hidden_act`` / ``hidden_activation``."""
    if name not in _GATED:
        raise ValueError(f"MLP activation {name!r} is not supported; pagedllm supports "
                         f"{', '.join(_GATED)}.")
    return _GATED[name]()
