"""--quantization int4 / int8 on the CPU: the kernels, and the bfloat16 GEMM that many-row products
take, equal "dequantize, then multiply in float32" on random inputs; GGUF Q4_1 blocks requantize
to their own 4-bit values; layers and the LM head are taken over by the methods; the default
model's quantized greedy output stays with the float32 reference (the dequantized GGUF)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.quantization import quantize_model
from pagedllm.layers.quantization.int_weight_only import (
    INT4_GROUP,
    Int4LinearMethod,
    Int8LinearMethod,
    Int8LMHeadMethod,
    bf16_linear,
    dequantize_int4,
    dequantize_int8,
    dequantize_int8_bf16,
    int4_linear,
    int4_linear_ref,
    int8_as_int4_pair,
    int8_linear,
    int8_linear_ref,
    int8_pair_linear,
    quantize_int4,
    quantize_int8,
)
from pagedllm.layers.vocab_parallel import ParallelLMHead


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_int4_kernel_matches_dequantized_product(with_bias: bool, rows: int) -> None:
    w = torch.randn(96, 128, generator=_gen(0)) * 0.05
    q, scale_and_zero = quantize_int4(w)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = torch.randn(2, rows, 128, generator=_gen(1))
    bias = torch.randn(96, generator=_gen(2)) if with_bias else None
    out = int4_linear(x, packed, scale_and_zero, bias)
    assert out.shape == (2, rows, 96) and out.dtype == torch.float32
    # both round the float32 sum to bfloat16: a last-bit difference where the order differs
    torch.testing.assert_close(out, int4_linear_ref(x, q, scale_and_zero, bias),
                               rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_int8_kernel_matches_dequantized_product(rows: int) -> None:
    w = torch.randn(40, 80, generator=_gen(0))
    q, scale = quantize_int8(w)
    x = torch.randn(rows, 80, generator=_gen(1))
    bias = torch.randn(40, generator=_gen(2))
    torch.testing.assert_close(int8_linear(x, q, scale, bias), int8_linear_ref(x, q, scale, bias),
                               rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("rows", [10, 70])
def test_bf16_gemm_matches_dequantized_product(method: str, rows: int) -> None:
    """The many-row path multiplies by the dequantized weight rounded to bfloat16: against the
    float32 product of the same input, it is off by at most that rounding (2^-9 of each weight)
    plus both outputs' rounding to bfloat16 (2^-9 each)."""
    w = torch.randn(96, 128, generator=_gen(0)) * 0.05
    if method == "int4":
        q, scales = quantize_int4(w)
        dequantized, ref = dequantize_int4(q, scales), int4_linear_ref
    else:
        q, scales = quantize_int8(w)
        dequantized, ref = dequantize_int8(q, scales), int8_linear_ref
    x = torch.randn(rows, 128, generator=_gen(1))
    bias = torch.randn(96, generator=_gen(2))
    out = bf16_linear(x, dequantized.to(torch.bfloat16), bias)
    expected = ref(x, q, scales, bias)
    x16 = x.to(torch.bfloat16).float()
    bound = 2.0**-9 * (x16.abs() @ dequantized.abs().t()) + 2.0**-8 * (expected - bias).abs()
    assert ((out - expected).abs() <= bound + 1e-6).all()


def test_bf16_dequantization_of_int8_is_the_float32_one_rounded() -> None:
    """The int8 layers' bfloat16 copy, computed in bfloat16, has the bits of the float32
    dequantization rounded once (every int8 value, scales of many magnitudes)."""
    q = torch.arange(-127, 128, dtype=torch.int8).repeat(40, 1)
    scale = (torch.rand(40, generator=_gen(3)) * 10.0 ** torch.arange(-6, 4).repeat(4)).to(
        torch.bfloat16)
    assert torch.equal(dequantize_int8_bf16(q, scale),
                       dequantize_int8(q, scale).to(torch.bfloat16))


@pytest.mark.parametrize("inputs", [64, 96, 576])  # groups of 64, 32, 64
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_int8_as_an_int4_pair_matches_the_int8_product(inputs: int, rows: int) -> None:
    """The LM head's few-row product: the int8 values as two int4 rows each (q = 16 hi + lo).
    The int4 kernel dequantizes each half in bfloat16 (up to 2^-9 of |16 scale hi| and of
    |scale lo| + 8 scale, its zero) and rounds each half's output to bfloat16 (2^-9 each)."""
    w = torch.randn(80, inputs, generator=_gen(inputs)) * 0.05
    q, scale = quantize_int8(w)
    packed, scale_and_zero, group = int8_as_int4_pair(q, scale)
    assert scale_and_zero.shape == (inputs // group, 160, 2)
    x = torch.randn(rows, inputs, generator=_gen(rows))
    bias = torch.randn(80, generator=_gen(2))
    out = int8_pair_linear(x, packed, scale_and_zero, group, bias)
    expected = int8_linear_ref(x, q, scale, bias)
    hi = q.int().div(16, rounding_mode="floor")
    s = scale.float()[:, None]
    halves = (16 * s * hi).abs() + (s * (q - 16 * hi)).abs() + 8 * s  # [80, K]
    x16 = x.to(torch.bfloat16).float()
    bound = 2.0**-8 * (x16.abs() @ halves.t()) + 2.0**-8 * (expected - bias).abs()
    assert ((out - expected).abs() <= bound + 1e-6).all()
    # each weight: its two halves (read back through the kernel) add up to the int8 value
    unpacked = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.eye(inputs, dtype=torch.bfloat16), packed, group, scale_and_zero).float().t()
    err = (unpacked[:80] + unpacked[80:] - dequantize_int8(q, scale)).abs()
    assert (err <= 2.0**-8 * halves).all()


def _integer_kernel(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(layer, "weight_int4"):
        return int4_linear(x, layer.weight_int4, layer.scale_and_zero, None)
    if hasattr(layer, "weight_int4_pair"):
        return int8_pair_linear(x, layer.weight_int4_pair, layer.pair_scale_and_zero,
                                layer.pair_group, None)
    return int8_linear(x, layer.weight_int8, layer.weight_scale, None)


@pytest.mark.parametrize("method_class", [Int4LinearMethod, Int8LinearMethod, Int8LMHeadMethod])
def test_few_rows_take_the_integer_kernel_and_many_the_bf16_gemm(method_class: type) -> None:
    layer = ColumnParallelLinear(128, [96])
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.05, generator=_gen(0))
    method = method_class()
    method.process_weights_after_loading(layer)
    for rows in (1, method.gemm_rows - 1, method.gemm_rows, 3 * method.gemm_rows):
        x = torch.randn(rows, 128, generator=_gen(rows))
        expected = _integer_kernel(layer, x) if rows < method.gemm_rows \
            else bf16_linear(x, layer.weight_bf16, None)
        assert torch.equal(method.apply(layer, x, None), expected), rows


def test_q4_1_blocks_requantize_to_their_own_values() -> None:
    """Weights dequantized from Q4_1 (w = d q + m, fp16 d and m, q in 0..15 reaching both ends
    in each block) give back q, and differ from w only by bfloat16's rounding of the scale and
    of the zero (up to 2^-8 relative each: 8 significant bits): w' - w = q (scale - d) plus the
    zero's rounding."""
    n, blocks = 32, 6
    g = _gen(0)
    d = (torch.rand(n, blocks, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (torch.randn(n, blocks, 1, generator=g) * 0.05).half().float()
    q = torch.randint(0, 16, (n, blocks, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(n, blocks * INT4_GROUP)
    q_back, scale_and_zero = quantize_int4(w)
    assert torch.equal(q_back, q.reshape(n, -1).int())
    bound = (15 * d + (m.abs() + 9 * d)) * 2.0**-8  # q <= 15; |zero| <= |m| + 8 scale
    err = (dequantize_int4(q_back, scale_and_zero) - w).abs().reshape(n, blocks, INT4_GROUP)
    assert (err <= bound).all()


def test_default_gguf_loads_its_q4_1_blocks_as_requantizing_would() -> None:
    """`--quantization int4` on the default GGUF (all its linear weights Q4_1) loads the raw
    blocks (no float32 copy, no requantization) and ends with the very tensors requantizing
    the float32 reference's weights gives, in every layer."""
    from pagedllm import LLM
    from pagedllm.engine.builder import resolve_engine_args
    from pagedllm.layers.linear import LinearBase
    from pagedllm.layers.quantization.checkpoint import LoadQuantization

    kwargs = dict(kv_cache_memory_bytes=16 * 2**20, max_model_len=128)
    assert resolve_engine_args({"quantization": "int4", **kwargs})[3] == \
        LoadQuantization("int4", prequantized=True)
    quantized, reference = LLM(quantization="int4", **kwargs), LLM(**kwargs)
    layers = {name: m for name, m in reference.engine.core.runner.model.named_modules()
              if isinstance(m, LinearBase)}
    checked = 0
    for name, layer in quantized.engine.core.runner.model.named_modules():
        if isinstance(layer, LinearBase):
            q, scale_and_zero = quantize_int4(layers[name].weight.data)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            assert torch.equal(layer.weight_int4, packed), name
            assert torch.equal(layer.scale_and_zero, scale_and_zero), name
            checked += 1
    assert checked == len(layers) == 120


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_layers_and_lm_head_stay_close(method: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Sequential(ColumnParallelLinear(64, [64, 32], bias=True),
                                     RowParallelLinear(96, 64))
    model.lm_head = ParallelLMHead(80, 64)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    x = torch.randn(7, 64)
    expected = model.lm_head(model.proj(x))
    quantize_model(model, method)
    assert not hasattr(model.proj[0], "weight") and not hasattr(model.lm_head, "weight")
    assert model.lm_head.method.name == "int8"
    out = model.lm_head(model.proj(x))
    # int4: 16 levels per group of 32 (~8 % RMS weight error); int8: ~1 %, bfloat16 activations
    limit = 0.15 if method == "int4" else 0.03
    assert ((out - expected).norm() / expected.norm()).item() < limit


@pytest.mark.parametrize(("method", "inputs", "multiple"), [("int4", 48, 32), ("int8", 72, 16)])
def test_shapes_the_kernels_cannot_take_are_refused(method: str, inputs: int,
                                                    multiple: int) -> None:
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        quantize_model(ColumnParallelLinear(inputs, [32]), method)


def test_default_model_in_int4_stays_with_its_float32_reference() -> None:
    """The GGUF's Q4_1 layers in their own 4 bits (and its Q8_0 LM head in int8) against the
    same file dequantized to float32, on the reference's greedy tokens (measured: top-1
    agreement 98.8 %, mean |dlogprob| 0.036, largest 0.25, over 32 tokens of 8 prompts)."""
    from pagedllm import LLM
    from pagedllm.benchmarks.quant_accuracy import compare_to_reference

    kwargs = dict(kv_cache_memory_bytes=64 * 2**20, max_model_len=256)
    report = compare_to_reference(LLM(**kwargs), LLM(quantization="int4", **kwargs),
                                  num_tokens=16)
    assert report.top1_agreement >= 0.95, report.summary()
    assert report.mean_abs_logprob_diff < 0.06 and report.max_abs_logprob_diff < 0.5, \
        report.summary()


@pytest.mark.parametrize(("flags", "expected"), [
    ({}, "int4"), ({"device": "cpu"}, "int4"), ({"dtype": "float32"}, None),
    ({"quantization": "int8"}, "int8"), ({"device": "cuda"}, None)])
def test_serve_keeps_the_default_gguf_in_4_bits_on_the_cpu(flags: dict, expected: str | None,
                                                           ) -> None:
    from pagedllm.layers.quantization.int_weight_only import serve_default_quantization

    assert serve_default_quantization(flags) == expected


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_memory_plan_counts_what_the_cpu_methods_hold(method: str) -> None:
    """``memory.cpu_int_weight_bytes`` (what `pagedllm plan` budgets for int4/int8 on the CPU)
    is the loaded model's own byte count: integers, scales, bfloat16 copies, the LM head's pair
    and the float32 embedding."""
    from pagedllm import LLM
    from pagedllm.worker import memory

    llm = LLM(quantization=method, kv_cache_memory_bytes=16 * 2**20, max_model_len=128)
    runner = llm.engine.core.runner
    assert memory.cpu_int_weight_bytes(runner.arch, method, torch.float32) == \
        memory.loaded_weight_bytes(runner.model)
