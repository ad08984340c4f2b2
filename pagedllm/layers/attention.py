"""The attention layer model code calls: it hands q, k, v to the step's attention backend,
with the layer's own options (sliding window, logit soft-cap; 0 = off)."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backend import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int = 0, softcap: float = 0.0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window, self.softcap = sliding_window, softcap
        # An FP8 KV cache's per-tensor scales (vLLM's k_scale/v_scale; 1.0: not calibrated).
        self.k_scale, self.v_scale = 1.0, 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H * D]."""
        ctx = get_forward_context()
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.metadata,
                                  self.scale, sliding_window=self.sliding_window,
                                  softcap=self.softcap, k_scale=self.k_scale,
                                  v_scale=self.v_scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
