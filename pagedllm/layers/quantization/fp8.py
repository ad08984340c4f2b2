"""FP8 (e4m3): the number format's arithmetic, and ``--quantization fp8`` for linear layers.

Quantizing with a scale ``s`` stores ``fp8(clamp(x * (1 / s), -448, 448))`` (round to nearest
even) and reads back ``fp8 * s``. The reciprocal is taken once in fp32, so that the torch code
and the Triton kernels round identically (a division on the GPU is not IEEE-exact).

``Fp8LinearMethod``: weights per output channel (one fp32 scale per row of the rank's shard),
activations per token, quantized on the fly; the product is ``torch._scaled_mm`` (FP8 tensor
cores on Hopper, an emulation on the CPU that is exact in fp32), rescaled by ``x_scale[token] *
w_scale[channel]`` in its epilogue. On a GPU, steps of at most ``SMALL_M`` tokens (decodes:
bound by reading the weight) take ``kernels.fp8_gemm`` instead, which upcasts the weight in
registers and leaves the activations unquantized (weight-only FP8, one kernel instead of two,
and slightly closer to the model dtype). Checkpoints already in FP8 keep their values: a per-
tensor scale of one piece of a merged layer (q, k, v; gate, up) becomes the per-channel scale of
that piece's rows, so nothing is requantized (see ``create_weights``). The embeddings and the LM
head are not linear layers here and stay in the model dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pagedllm.layers import dispatch
from pagedllm.layers.quantization import METHODS, LinearMethod

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
_MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero row gets this scale, never 0 (no 0 * inf)
SMALL_M = 16  # up to this many tokens on a GPU: the weight-only kernel (kernels.fp8_gemm)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for ``--kv-cache-dtype``: auto -> the model's; fp8 ->
    float8_e4m3fn (values stored as x / scale, see ``quantize``)."""
    if name == "auto":
        return model_dtype
    if name in FP8_KV_CACHE_DTYPES:
        return FP8_DTYPE
    raise ValueError(f"kv_cache_dtype {name!r} is not supported; choose auto, "
                     f"{' or '.join(FP8_KV_CACHE_DTYPES)}")


def quantize(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3 (saturated at +-448). ``scale``: a float, or fp32 broadcasting to x."""
    inv = 1.0 / scale if isinstance(scale, float) else scale.float().reciprocal()
    return (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] with its own scale, amax / 448: (fp8 [M, K], fp32 scales [M, 1])."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return quantize(x, scale), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_ref``, one fused kernel per call on a GPU (one pass over x)."""
    if dispatch.use_triton(x):
        from pagedllm.kernels.fp8_quant import quantize_rows_triton

        return quantize_rows_triton(x)
    return quantize_rows_ref(x)


class Fp8Rows(NamedTuple):
    """Activations [M, K] already quantized per token (``quantize_rows``), handed to an FP8
    product by the kernel before it (RMSNorm, SiLU-and-mul), which quantized in its epilogue."""

    values: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, 1] fp32
    dtype: torch.dtype  # the activations' own dtype: the product's output


def fp8_rows(x: torch.Tensor) -> Fp8Rows:
    """x [M, K] quantized per token: the unfused form of a kernel's FP8 epilogue."""
    return Fp8Rows(*quantize_rows(x), x.dtype)


def quantizes_activations(x: torch.Tensor) -> bool:
    """Whether ``fp8_linear`` quantizes x [..., K] per token (else, on a GPU at most
    ``SMALL_M`` rows, the weight-only kernel takes x as it is)."""
    return not (x.numel() <= SMALL_M * x.shape[-1] and dispatch.use_triton(x))


def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (float) times an FP8 weight [N, K] with scales [1, N] -> [..., N] in x's dtype.

    Activations are quantized per token (or come so: ``Fp8Rows``); ``_scaled_mm`` takes the
    weight column-major (W^T of a row-major W) and multiplies by the scales in fp32 before
    rounding to the output. On a GPU, at most ``SMALL_M`` rows take the weight-only kernel
    instead (activations as they are: ``fp8_weight_linear_ref``).
    """
    if isinstance(x, Fp8Rows):
        xq, x_scale, dtype = x
        lead = xq.shape[:-1]
    elif not quantizes_activations(x):
        from pagedllm.kernels.fp8_gemm import fp8_weight_gemm_triton

        out = fp8_weight_gemm_triton(x.reshape(-1, x.shape[-1]), weight, weight_scale, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    else:
        xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        dtype, lead = x.dtype, x.shape[:-1]
    # cuBLAS's row-wise scaled products write bf16 only (the CPU's write any float dtype).
    out_dtype = torch.bfloat16 if xq.is_cuda or dtype == torch.float16 else dtype
    fused_bias = bias is not None and bias.dtype == out_dtype
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale,
                           bias=bias if fused_bias else None, out_dtype=out_dtype)
    if bias is not None and not fused_bias:
        out = out + bias
    return out.to(dtype).reshape(*lead, weight.shape[0])


def fp8_weight_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The weight-only form (``kernels.fp8_gemm``): x as it is, times the dequantized weight."""
    out = x.float() @ (weight.float() * weight_scale.reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``fp8_linear`` spelled out: dequantize both operands to fp32 and multiply."""
    xq, x_scale = quantize_rows_ref(x.reshape(-1, x.shape[-1]))
    out = (xq.float() * x_scale) @ (weight.float() * weight_scale.reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Fp8LinearMethod(LinearMethod):
    """``weight`` [N, K] float8_e4m3fn and ``weight_scale`` [1, N] fp32 after loading."""

    name = "fp8"

    def create_weights(self, layer: nn.Module) -> None:
        """Before loading an FP8 checkpoint: an FP8 ``weight`` (same shape and loader) and a
        per-channel ``weight_scale`` [N] that takes the checkpoint's per-tensor or per-channel
        scales (NaN until loaded, so a layer the checkpoint left unquantized is caught)."""
        loader = layer.weight.weight_loader
        weight = nn.Parameter(torch.empty_like(layer.weight, dtype=FP8_DTYPE),
                              requires_grad=False)
        weight.weight_loader = loader  # type: ignore[attr-defined]
        layer.weight = weight
        scale = nn.Parameter(torch.full((layer.weight.shape[0],), float("nan"),
                                        dtype=torch.float32, device=layer.weight.device),
                             requires_grad=False)
        scale.weight_loader = _scale_loader(layer)  # type: ignore[attr-defined]
        layer.weight_scale = scale

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.dtype == FP8_DTYPE:  # loaded from an FP8 checkpoint
            scale = layer.weight_scale.data.float()
            if torch.isnan(scale).any():
                raise ValueError(f"an FP8 layer ({type(layer).__name__} of shape "
                                 f"{tuple(layer.weight.shape)}) got no weight_scale from the "
                                 "checkpoint")
        else:
            w, scale = quantize_rows(layer.weight.data)
            layer.weight = nn.Parameter(w, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)

    def takes_fp8_rows(self, x: torch.Tensor) -> bool:
        return quantizes_activations(x)

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Rows,
              bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)


def _scale_loader(layer: nn.Module):  # noqa: ANN202
    """Copies a checkpoint scale into the rows it covers of the per-channel scale vector: a
    per-tensor scale (one value) fills its piece's rows of this rank's shard, a per-channel one
    ([N] or [N, 1]) is sliced as the weight's rows are. Row-parallel layers hold all rows."""
    from pagedllm.layers.linear import ColumnParallelLinear

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        loaded = loaded.float().reshape(-1)
        if not isinstance(layer, ColumnParallelLinear):
            param.data.copy_(loaded.expand(param.shape[0]) if loaded.numel() == 1 else loaded)
            return
        size = layer.shard_sizes[shard_id]
        rows = param.data.narrow(0, sum(layer.shard_sizes[:shard_id]), size)
        if loaded.numel() == 1:
            rows.fill_(loaded.item())
        else:
            rows.copy_(loaded.narrow(0, layer.slice_index[shard_id] * size, size))

    return load


METHODS[Fp8LinearMethod.name] = Fp8LinearMethod
