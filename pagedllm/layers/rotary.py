"""Rotary position embedding (the "rotate half" / NeoX layout used by Llama and Qwen), with
transformers' RoPE scaling types baked into one cos/sin table over every position.

transformers recomputes the frequencies of two types from the sequence length at each forward;
a paged engine runs many sequences in one step, so here a row depends on its position only:

- ``dynamic``: transformers grows the NTK base only once a sequence passes
  max_position_embeddings, and pagedllm serves no position past it (max_model_len <= it), so the
  table is transformers' exactly (plain RoPE). vLLM instead serves up to max_position_embeddings
  x factor with one base fixed for that length, which differs at every position.
- ``longrope``: transformers uses the short factors while a forward's positions stay below
  original_max_position_embeddings and the long ones once they reach it, so rows below it are
  short and rows from it on are long. That is exact for every sequence whose prompt fits in the
  original window (one that crosses it while decoding keeps short keys for its first positions
  in transformers' Llama too, but transformers' Phi-3 then recomputes the whole cache with the
  long factors); a longer prompt is rotated with the long factors throughout in transformers.
  vLLM uses the long table for every position once max_model_len exceeds the original window.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pagedllm.layers import dispatch
from pagedllm.models.arch import RopeScaling


class RotaryEmbedding(nn.Module):
    """``max_position`` is the model's max_position_embeddings (``dynamic`` reads it too)."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: RopeScaling | None = None) -> None:
        super().__init__()
        cos, sin = rope_cos_sin(head_dim, max_position, base, scaling or RopeScaling())
        self.register_buffer("cos", cos, persistent=False)  # [max_position, head_dim]
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the step's positions [T], each [T, 1, D]: looked up once per forward,
        shared by every layer."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def rope_cos_sin(head_dim: int, max_position: int, base: float,
                 scaling: RopeScaling) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_position, head_dim] in float32, each scaled by the attention factor, as
    transformers' rotary embedding computes them for those positions."""
    positions = torch.arange(max_position, dtype=torch.float32)
    inv_freq, attention_factor = rope_frequencies(head_dim, max_position, base, scaling)
    if scaling.freq_factors is not None:
        inv_freq = inv_freq / _per_pair(scaling.freq_factors, head_dim, "rope_freqs")
    freqs = positions[:, None] * inv_freq  # [max_position, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rope_frequencies(head_dim: int, max_position: int, base: float,
                     scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """transformers' ``ROPE_INIT_FUNCTIONS[rope_type]`` (same arithmetic, so the same bits):
    the inverse frequencies, [head_dim / 2] or per position [max_position, head_dim / 2], and
    the factor cos and sin are multiplied by."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D / 2]
    return _FREQUENCIES[scaling.rope_type](exponents, max_position, base, scaling)


def _per_pair(values: tuple[float, ...], head_dim: int, name: str) -> torch.Tensor:
    """One value per rotary pair, [head_dim / 2] in float32."""
    if len(values) != head_dim // 2:
        raise ValueError(f"RoPE {name} has {len(values)} values; head_dim {head_dim} needs "
                         f"{head_dim // 2}.")
    return torch.tensor(values, dtype=torch.float32)


def _default(exponents: torch.Tensor, max_position: int, base: float,
             s: RopeScaling) -> tuple[torch.Tensor, float]:
    return 1.0 / (base ** exponents), 1.0


def _linear(exponents: torch.Tensor, max_position: int, base: float,
            s: RopeScaling) -> tuple[torch.Tensor, float]:
    return 1.0 / (base ** exponents) / s.factor, 1.0


def _dynamic(exponents: torch.Tensor, max_position: int, base: float,
             s: RopeScaling) -> tuple[torch.Tensor, float]:
    # transformers' NTK base for a sequence of max_position tokens (it is ``base`` there, bar
    # rounding): the one it uses for every length up to max_position.
    dim = 2 * exponents.numel()
    ntk = base * ((s.factor * max_position / max_position) - (s.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (ntk ** exponents), 1.0


def _yarn(exponents: torch.Tensor, max_position: int, base: float,
          s: RopeScaling) -> tuple[torch.Tensor, float]:
    """Fast pairs (index below the ramp) keep their frequency, slow ones (above it) are divided
    by factor, and the pairs on the ramp blend the two linearly."""
    dim = 2 * exponents.numel()
    pos_freqs = base ** exponents
    low, high = _yarn_correction_range(s, dim, base)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # the share of the plain frequency in each pair
    inv_freq = (1.0 / (s.factor * pos_freqs) * (1 - extrapolation)
                + 1.0 / pos_freqs * extrapolation)
    return inv_freq, _yarn_attention_factor(s)


def _yarn_correction_range(s: RopeScaling, dim: int, base: float) -> tuple[float, float]:
    """The pair indices between which YaRN ramps from extrapolation to interpolation."""
    assert s.original_max_position_embeddings is not None

    def pair_of(rotations: float) -> float:  # turning ``rotations`` times in the window
        return (dim * math.log(s.original_max_position_embeddings
                               / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = pair_of(s.beta_fast), pair_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_attention_factor(s: RopeScaling) -> float:
    if s.attention_factor is not None:
        return s.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
    return mscale(s.factor)


def _longrope(exponents: torch.Tensor, max_position: int, base: float,
              s: RopeScaling) -> tuple[torch.Tensor, float]:
    """Short factors below original_max_position_embeddings, long ones from it on."""
    assert s.original_max_position_embeddings is not None
    assert s.short_factor is not None and s.long_factor is not None
    original = s.original_max_position_embeddings
    head_dim = 2 * exponents.numel()
    short = 1.0 / (_per_pair(s.short_factor, head_dim, "short_factor") * base ** exponents)
    long = 1.0 / (_per_pair(s.long_factor, head_dim, "long_factor") * base ** exponents)
    is_long = torch.arange(max_position)[:, None] >= original  # [max_position, 1]
    inv_freq = torch.where(is_long, long, short)  # [max_position, D / 2]
    if s.attention_factor is not None:
        return inv_freq, s.attention_factor
    if s.factor <= 1.0:
        return inv_freq, 1.0
    return inv_freq, math.sqrt(1 + math.log(s.factor) / math.log(original))


def _llama3(exponents: torch.Tensor, max_position: int, base: float,
            s: RopeScaling) -> tuple[torch.Tensor, float]:
    """Long wavelengths divided by factor, short ones kept, a smooth blend between."""
    assert s.original_max_position_embeddings is not None
    original = s.original_max_position_embeddings
    inv_freq = 1.0 / (base ** exponents)
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


_Frequencies = Callable[[torch.Tensor, int, float, RopeScaling], tuple[torch.Tensor, float]]
_FREQUENCIES: dict[str, _Frequencies] = {
    "default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn,
    "longrope": _longrope, "llama3": _llama3,
}


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL): positions have three rows (temporal, height, width) and
    each rotary frequency reads one of them, ``mrope_section`` saying how many of the
    ``head_dim / 2`` frequencies each row drives. Three equal rows give plain RoPE."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 mrope_section: tuple[int, ...], scaling: RopeScaling | None = None) -> None:
        super().__init__(head_dim, max_position, base, scaling)
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
    """q: [T, H, D]; k: [T, Hkv, D]; cos, sin: [T, 1, R], R <= D. Returns new tensors.

    With R < D (partial rotary, Phi-4-mini) the first R dims of each head are rotated and the
    others pass through. On CUDA one kernel rotates q and k, which may be strided views of the
    fused qkv output.
    """
    cos, sin = cos_sin
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        q_rot, k_rot = apply_rotary(q[..., :rot], k[..., :rot], cos_sin)
        return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
    if dispatch.use_triton(q):
        from pagedllm.kernels.rotary import rotary_triton

        return rotary_triton(q, k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def apply_rotary_qk(qk: torch.Tensor, num_heads: int, cos_sin: tuple[torch.Tensor, torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary`` of q = qk[:, :num_heads] and k = qk[:, num_heads:], where qk
    [T, H + Hkv, D] holds the query heads and then the key heads (a view of the fused qkv
    output): on the CPU one rotation of the whole, half the small ops of two. Returns views
    [T, H, D] and [T, Hkv, D]."""
    cos, _ = cos_sin
    if dispatch.use_triton(qk) or cos.shape[-1] < qk.shape[-1]:
        return apply_rotary(qk[:, :num_heads], qk[:, num_heads:], cos_sin)
    out = _rotate(qk, *cos_sin)
    return out[:, :num_heads], out[:, num_heads:]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for x's halves (x1, x2): the
    halves swapped by one flip and the first negated in place, the same values in fewer ops."""
    rotated = x.unflatten(-1, (2, -1)).flip(-2)  # [..., 2, D / 2]: (x2, x1), a new tensor
    rotated.select(-2, 0).neg_()
    out = x * cos
    out += rotated.flatten(-2).mul_(sin)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The reference spelling of the rotation (transformers'): (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
