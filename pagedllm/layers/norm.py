"""RMSNorm, computed in float32 as the reference implementations do.

With a residual it also does the add that precedes it (vLLM's fused_add_rms_norm): decoder
layers carry the residual stream separately, so on CUDA each add and norm pair is one kernel.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers import dispatch
from pagedllm.layers.quantization.fp8 import Fp8Rows, fp8_rows


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor,
                residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with ``residual`` (norm(x + residual), x + residual).

        x: [T, N] or [T, heads, N] (q/k norm); the Triton path takes strided views of these.
        """
        return self._forward(x, residual, fp8=False)  # type: ignore[return-value]

    def quantized(self, x: torch.Tensor, residual: torch.Tensor | None,
                  ) -> tuple[Fp8Rows, torch.Tensor]:
        """(norm(x + residual), x + residual) with the normalized rows [T, N] quantized per token
        for the FP8 product they feed (``LinearBase.takes_fp8_rows``): on CUDA in the kernel's
        epilogue (no quantizer launch, no pass over its input), else ``fp8_rows`` of the output.
        Without a residual (the first layer) x is the stream returned."""
        if residual is None:
            return self._forward(x, None, fp8=True), x  # type: ignore[return-value]
        return self._forward(x, residual, fp8=True)  # type: ignore[return-value]

    def _forward(self, x: torch.Tensor, residual: torch.Tensor | None, fp8: bool,
                 ) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        if dispatch.use_triton(x):
            return self._triton(x, residual, self.weight, fp8)
        if residual is not None:
            x = x + residual
        out = fp8_rows(self._norm(x)) if fp8 else self._norm(x)
        return out if residual is None else (out, x)

    def _triton(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                fp8: bool = False):  # noqa: ANN202 (as _forward)
        from pagedllm.kernels import rms_norm

        if residual is None:
            return rms_norm.rms_norm_triton(x, weight, self.eps, fp8)
        return rms_norm.add_rms_norm_triton(x, residual, weight, self.eps, fp8)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) in float32."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's own: the same operations in the same order (the same bits, tested) in
            # one call instead of six
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self._norm_ref(x)

    def _norm_ref(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' order: normalized in float32, cast back, then scaled."""
        return self.weight * self._normalized(x).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weights are offsets from 1 (initialised to 0) and the scale
    ``1 + weight`` is applied in float32 before the cast back, as transformers' Gemma norms do.

    On CUDA the kernel gets the float32 scale as its weight; it rounds the normalized row to the
    input dtype before scaling (as for RMSNorm), so there it differs by that rounding.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def _forward(self, x: torch.Tensor, residual: torch.Tensor | None, fp8: bool,
                 ) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        if not dispatch.use_triton(x):
            return super()._forward(x, residual, fp8)
        out = self._triton(x, residual, 1.0 + self.weight.float())  # float32 output
        normed = (out if residual is None else out[0]).to(x.dtype)
        if fp8:  # no FP8 epilogue for the float32 scale: quantized after the kernel
            normed = fp8_rows(normed)
        return normed if residual is None else (normed, out[1])

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (self._normalized(x) * (1.0 + self.weight.float())).to(x.dtype)
