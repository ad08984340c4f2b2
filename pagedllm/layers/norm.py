"""RMSNorm, computed in float32 as the reference implementations do.

With a residual it also does the add that precedes it (vLLM's fused_add_rms_norm): decoder
layers carry the residual stream separately, so on CUDA each add and norm pair is one kernel.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from pagedllm.layers import dispatch


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
        if dispatch.use_triton(x):
            from pagedllm.kernels import rms_norm

            if residual is None:
                return rms_norm.rms_norm_triton(x, self.weight, self.eps)
            return rms_norm.add_rms_norm_triton(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
