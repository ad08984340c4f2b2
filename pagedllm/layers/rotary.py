"""Rotary position embedding (the "rotate half" / NeoX layout used by Llama and Qwen)."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers import dispatch


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                                   / head_dim))
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)  # [max_position, head_dim]
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the step's positions [T], each [T, 1, D]: looked up once per forward,
        shared by every layer."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL): positions have three rows (temporal, height, width) and
    each rotary frequency reads one of them, ``mrope_section`` saying how many of the
    ``head_dim / 2`` frequencies each row drives. Three equal rows give plain RoPE."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 mrope_section: tuple[int, ...]) -> None:
        super().__init__(head_dim, max_position, base)
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = "
                             f"{head_dim // 2}")
        rows = torch.repeat_interleave(torch.arange(len(mrope_section)),
                                       torch.tensor(mrope_section))
        self.register_buffer("rows", torch.cat((rows, rows)), persistent=False)  # [head_dim]

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, T] -> cos, sin each [T, 1, D], as ``RotaryEmbedding.forward``."""
        num_tokens = positions.shape[1]
        index = self.rows.expand(1, num_tokens, -1)  # [1, T, D]: the row of each dimension
        cos = self.cos[positions].gather(0, index)  # [3, T, D] -> [1, T, D]
        sin = self.sin[positions].gather(0, index)
        return (cos.view(num_tokens, 1, -1).to(dtype), sin.view(num_tokens, 1, -1).to(dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor,
                 cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D]; k: [T, Hkv, D]; cos, sin: [T, 1, D]. Returns new tensors.

    On CUDA one kernel rotates q and k, which may be strided views of the fused qkv output.
    """
    cos, sin = cos_sin
    if dispatch.use_triton(q):
        from pagedllm.kernels.rotary import rotary_triton

        return rotary_triton(q, k, cos, sin)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
