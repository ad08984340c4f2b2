"""Qwen2-VL: a vision transformer whose merged patch features take the place of the
``<|image_pad|>`` token embeddings in a Qwen2 decoder with M-RoPE (3-row positions).

The decoder is llama.py's ``DecoderForCausalLM`` (which picks M-RoPE from the arch); this file
adds the vision tower, the embedding merge, the checkpoint names and the prompt's M-RoPE
positions. The image preprocessor emits patches window by window (each ``merge x merge`` block
of patches consecutive), so the tower's rotary coordinates follow that order and the merger
folds every ``merge**2`` consecutive patches into one language-model token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.rotary import apply_rotary
from pagedllm.models.arch import ModelArch, VisionArch
from pagedllm.models.llama import DecoderForCausalLM

Grid = tuple[int, int, int]  # (temporal, height, width) in patches
NormFactory = Callable[[int], nn.Module]  # width -> the tower's norm layer
MlpFactory = Callable[[VisionArch], nn.Module]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported vision activation {name!r}")
    return _ACTIVATIONS[name]


def layer_norm(width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=1e-6)


class PatchEmbed(nn.Module):
    def __init__(self, v: VisionArch) -> None:
        super().__init__()
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_channels, v.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C * Tp * P * P] -> [N, embed_dim]. The kernel spans the whole patch, so the
        convolution is one matmul with the flattened kernel."""
        return F.linear(pixels, self.proj.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, v: VisionArch) -> None:
        super().__init__()
        self.num_heads = v.num_heads
        self.qkv = nn.Linear(v.embed_dim, 3 * v.embed_dim)
        self.proj = nn.Linear(v.embed_dim, v.embed_dim)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                seq_lens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, H, D] each
        q, k = apply_rotary(q.float(), k.float(), cos_sin)  # in float32, as the reference
        q, k = q.to(x.dtype), k.to(x.dtype)
        # Full (non-causal) attention inside each image, never across images. SDPA gets 4-D
        # [1, H, N, D] inputs: with 3-D ones the CPU takes a path 5x slower.
        out = [F.scaled_dot_product_attention(
                   qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],
                   vi.transpose(0, 1)[None])[0].transpose(0, 1)
               for qi, ki, vi in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens))]
        return self.proj(torch.cat(out).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: VisionArch) -> None:
        super().__init__()
        hidden = v.mlp_width
        self.fc1 = nn.Linear(v.embed_dim, hidden)
        self.act = activation(v.hidden_act)
        self.fc2 = nn.Linear(hidden, v.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionArch, norm: NormFactory = layer_norm,
                 mlp: MlpFactory = VisionMLP) -> None:
        super().__init__()
        self.norm1 = norm(v.embed_dim)
        self.attn = VisionAttention(v)
        self.norm2 = norm(v.embed_dim)
        self.mlp = mlp(v)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                seq_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each window of merge x merge patches (consecutive rows) -> one language-model token."""

    def __init__(self, v: VisionArch, norm: NormFactory = layer_norm) -> None:
        super().__init__()
        self.width = v.embed_dim * v.spatial_merge_size ** 2
        self.ln_q = norm(v.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, v.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    """Qwen2-VL's tower; ``norm`` and ``mlp`` are the hooks Qwen2.5-VL's tower changes."""

    def __init__(self, v: VisionArch, norm: NormFactory = layer_norm,
                 mlp: MlpFactory = VisionMLP) -> None:
        super().__init__()
        self.merge = v.spatial_merge_size
        self.patch_embed = PatchEmbed(v)
        self.blocks = nn.ModuleList(VisionBlock(v, norm, mlp) for _ in range(v.depth))
        self.merger = PatchMerger(v, norm)
        # 2D rotary: RoPE over head_dim / 2 per axis, the row's angles then the column's
        # filling each half of the head (NeoX layout).
        half = v.head_dim // 2
        inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.int64).float()
                                           / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 4]

    def forward(self, pixels: torch.Tensor, grid_thw: list[Grid]) -> torch.Tensor:
        """[num_patches, C * Tp * P * P] -> [num_patches / merge**2, out_hidden_size]."""
        x = self.patch_embed(pixels)
        cos_sin = self._rotary(grid_thw)
        seq_lens = frame_lens(grid_thw)
        for block in self.blocks:
            x = block(x, cos_sin, seq_lens)
        return self.merger(x)

    def _rotary(self, grid_thw: list[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_patches, 1, head_dim] (float32) of each patch's (row, column)."""
        m, dev = self.merge, self.inv_freq.device
        coords = []
        for t, h, w in grid_thw:
            rows, cols = torch.meshgrid(torch.arange(h, device=dev),
                                        torch.arange(w, device=dev), indexing="ij")
            hw = torch.stack((rows, cols), dim=-1)  # [h, w, 2], then in window order
            hw = hw.view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            coords.append(hw.repeat(t, 1))
        freqs = (torch.cat(coords)[..., None].float() * self.inv_freq).flatten(1)  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [N, 1, D]
        return emb.cos(), emb.sin()


def frame_lens(grid_thw: list[Grid]) -> list[int]:
    """The patches of each frame of each image: full attention spans one frame."""
    return [h * w for t, h, w in grid_thw for _ in range(t)]


# transformers 5 in-memory names -> the names its checkpoints are saved with
_RENAMES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def _checkpoint_name(name: str) -> str:
    for new, old in _RENAMES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


class Qwen2VLForConditionalGeneration(nn.Module):
    # the image encoder; Qwen2.5-VL keeps everything else of this class
    vision_tower: type[VisionTransformer] = VisionTransformer

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        if arch.vision is None or arch.image_token_id is None or arch.mrope_section is None:
            raise ValueError(f"a {arch.architecture} config needs vision_config, image_token_id "
                             "and an mrope_section")
        self.arch = arch
        self.visual = self.vision_tower(arch.vision)
        self.language_model = DecoderForCausalLM(arch)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_embeds: torch.Tensor | None = None,
                image_token_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T], positions [3, T] -> hidden states [T, hidden].

        Rows of ``image_embeds`` [N, hidden] (model dtype) replace, in order, the embeddings
        of the tokens at ``image_token_index`` [N] (int64), by default of every
        ``image_token_id`` token; the caller makes the counts match.
        """
        decoder = self.language_model.model
        embeds = decoder.embed(input_ids)  # [T, hidden]
        if image_embeds is not None:  # neither way synchronizes with the host
            if image_token_index is None:
                mask = (input_ids == self.arch.image_token_id).unsqueeze(-1)
                embeds = embeds.masked_scatter(mask, image_embeds)
            else:
                embeds = embeds.index_copy(0, image_token_index, image_embeds)
        return decoder(input_ids, positions, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.language_model.compute_logits(hidden)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: list[Grid]) -> list[torch.Tensor]:
        """The language-model embeddings of a batch of images.

        pixel_values: [sum of t*h*w, C * Tp * P * P] (any float dtype, any device), the rows of
        the images in order, as the Qwen2-VL image processor emits them; grid_thw: each
        image's (t, h, w) in patches. Returns one [t*h*w / merge**2, hidden] tensor per image,
        in the model's dtype and on its device.
        """
        weight = self.visual.patch_embed.proj.weight
        merged = self.visual(pixel_values.to(weight.device, weight.dtype), grid_thw)
        merge = self.visual.merge
        return list(merged.split([t * h * w // merge ** 2 for t, h, w in grid_thw]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names: ``visual.*`` load here, ``model.*`` and ``lm_head.weight`` go to the
        decoder's loader (transformers 5 in-memory names are accepted too)."""
        params = dict(self.visual.named_parameters())
        loaded: set[str] = set()

        def decoder_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = _checkpoint_name(name)
                if not name.startswith("visual."):
                    yield name, tensor
                    continue
                name = name[len("visual."):]
                if name not in params:
                    raise ValueError(f"checkpoint tensor 'visual.{name}' has no parameter in "
                                     f"{type(self).__name__}")
                with torch.no_grad():
                    params[name].copy_(tensor)
                loaded.add(name)

        self.language_model.load_weights(decoder_weights())
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing parameters: {missing[:8]}")


def mrope_positions(token_ids: list[int], image_grids: list[Grid],
                    arch: ModelArch) -> tuple[np.ndarray, int]:
    """The M-RoPE positions [3, len(token_ids)] (int64) of a prompt, and its delta.

    Text tokens advance all three rows together. The ``t*h*w / merge**2`` tokens of image i
    (the i-th run of ``image_token_id``) take their (t, h / merge, w / merge) grid coordinates
    plus the running position, which then moves past the largest of them. A token generated
    at sequence index p has position ``p + delta`` in every row.
    """
    assert arch.vision is not None
    merge = arch.vision.spatial_merge_size
    ids = np.asarray(token_ids, dtype=np.int64)
    positions = np.empty((3, len(ids)), dtype=np.int64)
    start = pos = 0  # next token index, next position
    for t, h, w in image_grids:
        hits = np.flatnonzero(ids[start:] == arch.image_token_id)
        if not hits.size:
            raise ValueError("fewer image placeholder runs in the prompt than images")
        first = start + int(hits[0])
        positions[:, start:first] = pos + np.arange(first - start)
        pos += first - start
        grid = np.indices((t, h // merge, w // merge)).reshape(3, -1)  # (t, h, w) rows
        positions[:, first:first + grid.shape[1]] = pos + grid
        pos += max(t, h // merge, w // merge)
        start = first + grid.shape[1]
    positions[:, start:] = pos + np.arange(len(ids) - start)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta
