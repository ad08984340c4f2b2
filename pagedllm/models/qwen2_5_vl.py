"""Qwen2.5-VL: Qwen2-VL (qwen2_vl.py: the decoder with M-RoPE, the embedding merge, the
checkpoint names, the prompt's positions) with another vision tower.

The tower differs in its layers (RMSNorm, a gated SiLU MLP with biases) and in attention: every
block but ``fullatt_block_indexes`` attends only inside square windows of ``window_size`` pixels
(``window_size / patch_size / merge`` merged patches a side; the windows at the bottom and right
edges may be smaller). To make each window a contiguous run, the merged patches (each ``merge**2``
consecutive rows) are reordered window by window before the blocks and put back after the merger.
Full attention is unchanged by the reorder, since each frame's patches stay together.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.norm import RMSNorm
from pagedllm.models.arch import VisionArch
from pagedllm.models.qwen2_vl import (
    Grid,
    Qwen2VLForConditionalGeneration,
    VisionTransformer,
    activation,
    frame_lens,
)


def rms_norm(width: int) -> nn.Module:
    return RMSNorm(width, eps=1e-6)


class GatedVisionMLP(nn.Module):
    def __init__(self, v: VisionArch) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(v.embed_dim, v.mlp_width)
        self.up_proj = nn.Linear(v.embed_dim, v.mlp_width)
        self.down_proj = nn.Linear(v.mlp_width, v.embed_dim)
        self.act = activation(v.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def window_order(grid_thw: list[Grid], merge: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """(order, window_lens) of a batch of images, windows of ``side`` merged patches a side.

    ``order`` [num_patches / merge**2] (int64): the merged patches' indices window by window
    (per frame, windows row-major, patches row-major inside each); ``window_lens``: the patches
    (unmerged) of each window, in that order.
    """
    order: list[torch.Tensor] = []
    lens: list[int] = []
    start = 0
    for t, h, w in grid_thw:
        merged = torch.arange(t * (h // merge) * (w // merge)).view(t, h // merge, w // merge)
        for frame in merged + start:
            for band in frame.split(side, 0):
                for window in band.split(side, 1):
                    order.append(window.flatten())
                    lens.append(window.numel() * merge ** 2)
        start += merged.numel()
    return torch.cat(order), lens


class WindowedVisionTransformer(VisionTransformer):
    def __init__(self, v: VisionArch) -> None:
        super().__init__(v, norm=rms_norm, mlp=GatedVisionMLP)
        self.window_side = v.window_size // v.patch_size // v.spatial_merge_size
        if self.window_side < 1:
            raise ValueError(f"window_size {v.window_size} is less than one merged patch "
                             f"({v.patch_size * v.spatial_merge_size} pixels)")
        self.full_attention = set(v.fullatt_block_indexes)

    def forward(self, pixels: torch.Tensor, grid_thw: list[Grid]) -> torch.Tensor:
        """[num_patches, C * Tp * P * P] -> [num_patches / merge**2, out_hidden_size]."""
        order, window_lens = window_order(grid_thw, self.merge, self.window_side)
        order = order.to(pixels.device)
        x = self._to_windows(self.patch_embed(pixels), order)
        cos, sin = (self._to_windows(c, order) for c in self._rotary(grid_thw))
        seq_lens = frame_lens(grid_thw)
        for i, block in enumerate(self.blocks):
            x = block(x, (cos, sin), seq_lens if i in self.full_attention else window_lens)
        return self.merger(x)[torch.argsort(order)]

    def _to_windows(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Rows [N, ...] -> the same rows, each run of merge**2 moved to its window's place."""
        return x.view(len(order), -1, *x.shape[1:])[order].flatten(0, 1)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = WindowedVisionTransformer
