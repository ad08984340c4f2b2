"""Integer weight-only quantization for the CPU: ``--quantization int4`` and ``int8``.

A decode step on the CPU reads every weight once per token, so its time is the weights' bytes
over the memory bandwidth: float32 SmolLM2-135M is 540 MB a token, its 4-bit form ~90 MB. These
methods keep the weights in integers and multiply with PyTorch's own CPU kernels, which convert
the weights on the fly inside the product (nothing is dequantized to memory):

- ``int4``: asymmetric, one scale and one zero per group of 32 inputs of each output row
  (``w = (q - 8) * scale + zero``, q in 0..15), through ``_weight_int4pack_mm_for_cpu``. A
  GGUF Q4_1 block (``w = d * q + m``, 32 inputs) is this format with ``scale = d`` and
  ``zero = m + 8 d``: its dequantized weights requantize to the same q (the group's min and max
  are ``m`` and ``m + 15 d``), so Q4_1 files keep their own 4-bit values.
- ``int8``: symmetric, one scale per output row (``w = q * scale``, q in -127..127), through
  ``_weight_int8pack_mm``.

Both put the LM head in int8 (``Int8LMHeadMethod``), whose one-row product reads each int8
value as two int4 ones through the int4 kernel, faster than the int8 kernel at one row.

Both kernels are fast only with bfloat16 activations and bfloat16 scales (their float32 paths
are scalar: 10-20x slower, measured), so the product runs in bfloat16 with float32 accumulation:
the input is rounded to bfloat16, the output too, and both are float32 again around it. The
reference (``*_ref``) is "dequantize, then multiply in float32" on the same stored values.

The integer kernels pay off while a product reads more weight bytes than it computes (a few
rows: decode). From ``gemm_rows`` rows on (a prefill chunk, a large decode batch) they cost
about float32's FLOPs or more (the int8 one grows linearly with the rows), while a bfloat16 GEMM
(oneDNN's AVX-512 BF16) runs ~2x float32's; so each layer also keeps its dequantized weight in
bfloat16 and many-row products use that (``bf16_linear``): 2 more bytes a weight, ~212 MB for
SmolLM2-135M's decoder and ~57 MB for its LM head (the int4 weights are ~66 MB, float32 would be
~540 MB). The copy is the stored values rounded to bfloat16 (8 significant bits, as the
activations are): the two paths differ by that rounding, up to 2^-9 of each weight, so a
token's logits depend (in their last bits) on how many rows its step had, as on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.quantization import METHODS, LinearMethod

INT4_GROUP = 32  # inputs per scale and zero (GGUF's block of Q4_0/Q4_1/Q8_0)
_KERNEL_DTYPE = torch.bfloat16  # the dtype the CPU kernels' fast paths take
_INNER_K_TILES = 1  # the int4 packing's K tiles (the CPU kernel takes any of 1, 2, 4, 8)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (K a multiple of 32) -> q [N, K] int32 in 0..15 and scale_and_zero
    [K / 32, N, 2] bfloat16. scale = (max - min) / 15 of each group, zero = min + 8 scale (both
    rounded to bfloat16 first, and q chosen for the rounded values)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.aminmax(dim=-1, keepdim=True)
    scale, zero = _int4_scale_zero((high - low) / 15, low)
    scale_f = scale.float().masked_fill(scale == 0, 1.0)  # a constant group: q = 8, w = zero
    # in place: this runs over every weight at start-up (~0.4 s for SmolLM2's 106 M)
    q = (groups - zero.float()).div_(scale_f).add_(8).round_().clamp_(0, 15).to(torch.int32)
    return q.reshape(n, k), _scale_and_zero(scale, zero)


def _int4_scale_zero(scale: torch.Tensor, low: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's float32 scale and lowest value [N, K / 32, 1] -> the kernel's bfloat16 scale
    and zero (w = (q - 8) scale + zero): the scale rounded first, the zero from it."""
    scale = scale.to(_KERNEL_DTYPE)
    return scale, (low + 8 * scale.float()).to(_KERNEL_DTYPE)


def _scale_and_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, K / 32, 1] each -> the kernel's scale_and_zero [K / 32, N, 2]."""
    return torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that ``quantize_int4``'s values stand for."""
    n, k = q.shape
    scale, zero = scale_and_zero.float().transpose(0, 1).unbind(-1)  # [N, K / 32] each
    groups = q.reshape(n, k // INT4_GROUP, INT4_GROUP).float()
    # in place: ~8x faster than with temporaries, and it runs over every weight at start-up
    return groups.sub_(8).mul_(scale[..., None]).add_(zero[..., None]).reshape(n, k)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> q [N, K] int8 in -127..127 and per-row scales [N] bfloat16 (amax / 127,
    rounded to bfloat16 first; q chosen for the rounded scale)."""
    w = weight.float()
    scale = (w.abs().amax(-1) / 127).to(_KERNEL_DTYPE)
    scale_f = scale.float().masked_fill(scale == 0, 1.0)
    q = (w / scale_f[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float().mul_(scale.float()[:, None])


def dequantize_int8_bf16(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dequantize_int8`` rounded to bfloat16, computed in bfloat16: the same bits (the int8
    values are exact in bfloat16, and one product rounds once either way), 3x faster."""
    return q.to(_KERNEL_DTYPE) * scale[:, None]


# A decode step makes ~120 of these products, so the 2-D case (every linear layer's) skips
# the reshapes: each Python-level call costs about as much as a 576x576 product's arithmetic.
def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as contiguous bfloat16 rows [M, K] (the kernels' input)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x.to(_KERNEL_DTYPE).contiguous()


def _finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's [M, N] bfloat16 output in x's dtype and leading dims, plus the bias."""
    out = out.to(x.dtype)
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times the int4 weight (``_convert_weight_to_int4pack_for_cpu`` of q)."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x), packed, INT4_GROUP,
                                                     scale_and_zero)
    return _finish(out, x, bias)


def int4_linear_ref(x: torch.Tensor, q: torch.Tensor, scale_and_zero: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``int4_linear`` spelled out: bfloat16 input, float32 product with the dequantized weight,
    bfloat16 output."""
    out = _rows(x).float() @ dequantize_int4(q, scale_and_zero).t()
    return _finish(out.to(_KERNEL_DTYPE), x, bias)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    return _finish(torch._weight_int8pack_mm(_rows(x), q, scale), x, bias)


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    out = _rows(x).float() @ dequantize_int8(q, scale).t()
    return _finish(out.to(_KERNEL_DTYPE), x, bias)


def pair_group(k: int) -> int | None:
    """The group size of ``int8_as_int4_pair`` for ``k`` inputs: the largest the kernel takes
    that divides k (the scale is per row, so any group serves); None below 32."""
    return next((g for g in (256, 128, 64, 32) if k % g == 0), None)


def int8_as_int4_pair(q: torch.Tensor, scale: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An int8 weight (q [N, K], per-row scale [N] bfloat16) as an int4 one of 2N rows, for
    ``_weight_int4pack_mm_for_cpu``: (its packing, scale_and_zero [K / g, 2N, 2], group g).

    q = 16 hi + lo with hi in -8..7 and lo in 0..15. In the kernel's ``(q4 - 8) s4 + z4``, row
    i holds hi + 8 with s4 = 16 scale, z4 = 0, and row N + i holds lo with s4 = scale,
    z4 = 8 scale: scale times powers of two, exact in bfloat16, so the two rows' products add
    up to the int8 row's. The scale is per row, so g is the largest group size K allows."""
    n, k = q.shape
    group = pair_group(k)
    if group is None:
        raise ValueError(f"an int4 pair needs a multiple of 32 inputs, got {k}")
    # on the int8 values (4x fewer bytes than int32, ~3x faster at start-up): an arithmetic
    # shift is the floor division, the low four bits of two's complement are the remainder
    q4 = torch.cat([(q >> 4) + 8, q & 15]).to(torch.int32)  # [2N, K] in 0..15
    s = scale.float()
    scales = torch.cat([16 * s, s]).to(_KERNEL_DTYPE)
    zeros = torch.cat([torch.zeros_like(s), 8 * s]).to(_KERNEL_DTYPE)
    scale_and_zero = torch.stack([scales, zeros], dim=-1).expand(k // group, 2 * n, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, _INNER_K_TILES)
    return packed, scale_and_zero.contiguous(), group


def int8_pair_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
                     group: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times an int8 weight held as ``int8_as_int4_pair``: the two halves' bfloat16
    products added in float32 (the int8 kernel rounds the one sum to bfloat16 instead)."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x), packed, group, scale_and_zero)
    n = out.shape[-1] // 2
    return _finish(out[:, :n].float() + out[:, n:], x, bias)


# oneDNN compiles and keeps code for every row count its bfloat16 GEMM sees (~0.2-0.6 MB each,
# never given back: the server's engine grew ~12 MB a burst of 24 requests, measured), so rows
# are padded to a multiple of this: at most max_num_batched_tokens / 32 shapes a weight. Up to
# _GEMM_SMALL_BUCKET rows pad only to that (one more shape): near gemm_rows, padding 10 rows
# to 32 would cost more than the integer kernel saves.
_GEMM_ROW_BUCKET = 32
_GEMM_SMALL_BUCKET = 16
GEMM_TIER_ROWS = _GEMM_SMALL_BUCKET + 1  # the first row count of the larger bucket


def _gemm_padding(num_rows: int) -> int:
    bucket = _GEMM_SMALL_BUCKET if num_rows <= _GEMM_SMALL_BUCKET else _GEMM_ROW_BUCKET
    return -num_rows % bucket


def bf16_linear(x: torch.Tensor, weight_bf16: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times a bfloat16 weight [N, K] (a quantized weight dequantized): the
    many-row product, with the integer kernels' bfloat16 input and output; its reference is
    theirs, ``int4_linear_ref`` / ``int8_linear_ref``."""
    rows = _rows(x)
    num_rows = rows.shape[0]
    # Padded even by 0 rows: no branch on the amount for torch.compile to guard (and recompile)
    # on; the bucket's size is one (GEMM_TIER_ROWS, warmed up by --compile-cpu).
    rows = F.pad(rows, (0, 0, 0, _gemm_padding(num_rows)))
    return _finish(F.linear(rows, weight_bf16)[:num_rows], x, bias)


def _num_rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _replace_weight(layer: nn.Module, **tensors: torch.Tensor) -> None:
    """Drops the layer's float ``weight`` (a tied embedding keeps its own reference) and stores
    the quantized tensors as frozen parameters (counted in the model's weight bytes)."""
    del layer.weight
    for name, tensor in tensors.items():
        setattr(layer, name, nn.Parameter(tensor, requires_grad=False))


class Int8LinearMethod(LinearMethod):
    """``weight_int8`` [N, K] int8, ``weight_scale`` [N] bfloat16 and ``weight_bf16`` [N, K]
    after loading."""

    name = "int8"
    lm_head = "int8-lm-head"
    # From this many rows on, the bfloat16 GEMM (rows padded to 16) beats the int8 kernel
    # (measured, one thread, the 49152x576 LM head: 12.3 ms in int8 at 8 rows, 10.7 in bf16 at 16)
    gemm_rows = 8

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        n, k = layer.weight.shape
        # The kernel's single-row path reads past K when K is not a multiple of 16 (NaN or a
        # crash, seen with K = 8, 24, 72 in torch 2.13).
        if layer.weight.device.type != "cpu" or k % 16:
            raise ValueError(f"--quantization int8 runs on the CPU, with linear layers (this "
                             f"rank's shard) of a multiple of 16 inputs; a layer has {k} inputs "
                             f"on {layer.weight.device} (on a GPU, use fp8)")
        q, scale = quantize_int8(layer.weight.data)
        _replace_weight(layer, weight_int8=q, weight_scale=scale,
                        weight_bf16=dequantize_int8_bf16(q, scale))

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        if _num_rows(x) >= self.gemm_rows:
            return bf16_linear(x, layer.weight_bf16, bias)
        return int8_linear(x, layer.weight_int8, layer.weight_scale, bias)


class Int8LMHeadMethod(Int8LinearMethod):
    """The LM head's int8 (under ``--quantization int4`` and ``int8``): the same stored values,
    but fewer than ``gemm_rows`` rows multiply them as an int4 pair (``int8_as_int4_pair``, the
    same bytes): at one row the int4 kernel reads them faster than the int8 kernel reads its own
    (SmolLM2's 49152x576 head, one thread: 3.18 against 3.84 ms, docs/benchmarks.md). The pair's
    kernel rounds each half's weights and output to bfloat16, as the many-row GEMM rounds the
    weights: measured accuracy unchanged. A head whose inputs are not a multiple of 32 (the
    int4 kernel's groups) keeps the int8 kernel."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        n, k = layer.weight.shape
        layer.pair_group = 0
        if k % INT4_GROUP:
            super().process_weights_after_loading(layer)
            return
        if layer.weight.device.type != "cpu":
            raise ValueError(f"--quantization int4/int8 run on the CPU; the LM head is on "
                             f"{layer.weight.device}")
        q, scale = quantize_int8(layer.weight.data)
        packed, scale_and_zero, layer.pair_group = int8_as_int4_pair(q, scale)
        _replace_weight(layer, weight_int4_pair=packed, pair_scale_and_zero=scale_and_zero,
                        weight_bf16=dequantize_int8_bf16(q, scale))

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        if not layer.pair_group or _num_rows(x) >= self.gemm_rows:
            return super().apply(layer, x, bias)
        return int8_pair_linear(x, layer.weight_int4_pair, layer.pair_scale_and_zero,
                                layer.pair_group, bias)


def int4_from_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 blocks (uint8 [N, K / 32 * 20]) -> ``quantize_int4``'s (q [N, K] int32,
    scale_and_zero [K / 32, N, 2] bfloat16) without going through floats: q as stored, the
    scale d and the lowest value m rounded by ``quantize_int4``'s own ``_int4_scale_zero`` (so
    a block whose q spans 0..15 gets the bits requantizing its dequantized values gives)."""
    from pagedllm.models.loader.gguf import split_q4_1

    q, d, m = split_q4_1(blocks)  # [N, K / 32, 32], [N, K / 32, 1] each
    return q.reshape(q.shape[0], -1).to(torch.int32), _scale_and_zero(*_int4_scale_zero(d, m))


class Int4LinearMethod(LinearMethod):
    """``weight_int4`` (the kernel's packing), ``scale_and_zero`` [K / 32, N, 2] bfloat16 and
    ``weight_bf16`` [N, K] after loading.

    A GGUF file whose linear weights are all Q4_1 loads prequantized (``create_weights``): each
    weight arrives as its raw blocks and is repacked from them, with no float32 copy and no
    requantization (~0.4 s of the default model's start-up)."""

    name = "int4"
    lm_head = "int8-lm-head"  # GGUF files keep it in 8 bits (Q8_0); in 4 bits 9 % off (measured)
    # From this many rows on, the bfloat16 GEMM beats the int4 kernel (measured, one thread,
    # 1536x576 and 576x1536: a tie at 8 rows, 1.5x at 12, 2.5x at 256)
    gemm_rows = 10

    def create_weights(self, layer: nn.Module) -> None:
        """Before loading Q4_1 blocks: ``weight`` as uint8 [N, K / 32 * 20] (row-sliced by the
        same loader, as the rows are the output channels)."""
        from pagedllm.models.loader.gguf import Q4_1_BLOCK_BYTES

        n, k = layer.weight.shape
        loader = layer.weight.weight_loader
        layer.weight = nn.Parameter(torch.empty(n, k // INT4_GROUP * Q4_1_BLOCK_BYTES,
                                                dtype=torch.uint8, device=layer.weight.device),
                                    requires_grad=False)
        layer.weight.weight_loader = loader  # type: ignore[attr-defined]

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from pagedllm.models.loader.gguf import Q4_1_BLOCK_BYTES

        blocks = layer.weight.dtype == torch.uint8  # Q4_1, from create_weights
        n, k = layer.weight.shape
        if blocks:
            k = k // Q4_1_BLOCK_BYTES * INT4_GROUP
        if layer.weight.device.type != "cpu" or k % INT4_GROUP or n % 16:
            raise ValueError(f"--quantization int4 runs on the CPU, with linear layers (this "
                             f"rank's shard) of a multiple of {INT4_GROUP} inputs and of 16 "
                             f"outputs; a layer has {k} inputs and {n} outputs on "
                             f"{layer.weight.device}")
        q, scale_and_zero = (int4_from_q4_1 if blocks else quantize_int4)(layer.weight.data)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        _replace_weight(layer, weight_int4=packed, scale_and_zero=scale_and_zero,
                        weight_bf16=dequantize_int4(q, scale_and_zero).to(_KERNEL_DTYPE))

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        if _num_rows(x) >= self.gemm_rows:
            return bf16_linear(x, layer.weight_bf16, bias)
        return int4_linear(x, layer.weight_int4, layer.scale_and_zero, bias)


def serve_default_quantization(kwargs: dict[str, Any]) -> str | None:
    """What ``pagedllm serve`` runs the linear layers in when neither ``--quantization`` nor
    ``--dtype`` is given: int4 for a GGUF file whose decoder weights are Q4_1, on the CPU (the
    file's own values, ~6x fewer bytes per token than float32: measured faster at batch 1 and
    batched, docs/benchmarks.md); else None (the model dtype). The offline ``LLM`` keeps the
    model dtype: it is the exact reference the tests hold against transformers."""
    from pagedllm.config import DeviceConfig
    from pagedllm.models.loader.gguf import gguf_linear_weights_are_q4_1
    from pagedllm.models.loader.source import resolve_model

    if kwargs.get("quantization") or kwargs.get("dtype") not in (None, "auto"):
        return kwargs.get("quantization")
    if DeviceConfig(kwargs.get("device", "auto")).resolved() != "cpu":
        return None
    source = resolve_model(kwargs.get("model"))
    return "int4" if source.kind == "gguf" and gguf_linear_weights_are_q4_1(source.path) \
        else None


METHODS["int4"] = Int4LinearMethod
METHODS["int8"] = Int8LinearMethod
METHODS["int8-lm-head"] = Int8LMHeadMethod  # the LM head's, not a --quantization choice
