"""The FP8 epilogues of the RMSNorm and SiLU-and-mul kernels store what the row quantizer stores
from the kernels' plain outputs, and a decoder with fused quantization equals one without.

On the GPU and in Triton's interpreter alike, the fused kernel must give the unfused pair's exact
bytes and scales (the same operations on the same values), so these compare with ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.backend import (  # noqa: E402
    AttentionMetadata,
    ForwardContext,
    forward_context,
)
from pagedllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedllm.kernels.activation import silu_and_mul_triton  # noqa: E402
from pagedllm.kernels.fp8_quant import quantize_rows_triton  # noqa: E402
from pagedllm.kernels.rms_norm import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from pagedllm.layers import dispatch  # noqa: E402
from pagedllm.layers.linear import LinearBase  # noqa: E402
from pagedllm.layers.norm import GemmaRMSNorm, RMSNorm  # noqa: E402
from pagedllm.layers.quantization import quantize_model  # noqa: E402
from pagedllm.layers.quantization.fp8 import Fp8LinearMethod, Fp8Rows, fp8_rows  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402
from pagedllm.models.arch import ModelArch  # noqa: E402
from pagedllm.models.llama import DecoderLayer  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def assert_same_rows(fused: Fp8Rows, plain: torch.Tensor) -> None:
    values, scale = quantize_rows_triton(plain)
    assert fused.dtype == plain.dtype and fused.values.shape == plain.shape
    if plain.is_cuda and plain.dtype == torch.float32:
        # Compiled apart, the two kernels may contract the norm's float32 arithmetic into FMAs
        # differently (a last-bit difference that a 16-bit output rounds away): the scales
        # within an ulp, a value on a rounding boundary one e4m3 step off.
        torch.testing.assert_close(fused.scale, scale, rtol=2**-22, atol=0)
        torch.testing.assert_close(fused.values.float(), values.float(), rtol=2**-3, atol=2**-9)
        return
    assert torch.equal(fused.scale, scale)
    assert torch.equal(fused.values.view(torch.uint8), values.view(torch.uint8))


@pytest.mark.parametrize("num_tokens,width", [(1, 64), (7, 96), (20, 1536)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_epilogue(num_tokens: int, width: int, dtype: torch.dtype) -> None:
    weight = randn(width, dtype=dtype, seed=1)
    # rows of very different sizes, one all zero (the smallest scale, never 0)
    x = randn(num_tokens, width, dtype=dtype, seed=2) * torch.logspace(
        -2, 2, num_tokens, device=DEVICE)[:, None].to(dtype)
    x[0] = 0
    assert_same_rows(rms_norm_triton(x, weight, 1e-6, fp8=True),
                     rms_norm_triton(x, weight, 1e-6))
    residual = randn(num_tokens, width, dtype=dtype, seed=3)
    fused, fused_residual = add_rms_norm_triton(x, residual, weight, 1e-6, fp8=True)
    plain, plain_residual = add_rms_norm_triton(x, residual, weight, 1e-6)
    assert_same_rows(fused, plain)
    assert torch.equal(fused_residual, plain_residual)


def test_rms_norm_epilogue_refuses_what_it_cannot_round() -> None:
    x = randn(3, 64, dtype=torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="FP8 output"):  # a float32 weight promotes the output
        rms_norm_triton(x, torch.ones(64, device=DEVICE), 1e-6, fp8=True)
    with pytest.raises(ValueError, match="FP8 output"):  # q/k heads are not a linear's input
        rms_norm_triton(x.view(3, 2, 32), torch.ones(32, device=DEVICE, dtype=x.dtype), 1e-6,
                        fp8=True)


@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (5, 160), (18, 1536)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_epilogue(num_tokens: int, inter: int, dtype: torch.dtype) -> None:
    x = randn(num_tokens, 2 * inter + 8, dtype=dtype, seed=inter)[:, 8:] * 3  # row-strided
    assert_same_rows(silu_and_mul_triton(x, fp8=True), silu_and_mul_triton(x))
    empty = silu_and_mul_triton(x[:0], fp8=True)
    assert empty.values.shape == (0, inter) and empty.scale.shape == (0, 1)


@pytest.mark.parametrize("kernels", [False, True])
def test_decoder_layer_fused_quantization_changes_nothing(kernels: bool,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """A decoder layer in FP8 whose norms and activation quantize for the products they feed
    (``takes_fp8_rows``) gives the bits of the same layer whose products quantize for
    themselves: on the torch path, and with the Triton kernels (interpreter on the CPU)."""
    arch = ModelArch.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "vocab_size": 50,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0})
    torch.manual_seed(0)
    layer = DecoderLayer(arch, 0).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    quantize_model(layer, "fp8")  # on torch's path (threads: the interpreter is not safe)
    monkeypatch.setattr(dispatch, "use_triton", lambda x: kernels)
    assert all(isinstance(m.method, Fp8LinearMethod) for m in layer.modules()
               if isinstance(m, LinearBase))
    num_tokens = 20  # more rows than SMALL_M: the products quantize their activations
    x, residual = (randn(num_tokens, 64, dtype=torch.bfloat16, seed=s) for s in (1, 2))
    positions = torch.arange(num_tokens, device=DEVICE)
    cos_sin = RotaryEmbedding(arch.head_dim, 4096, 10000.0).to(DEVICE)(positions, torch.bfloat16)
    metadata = AttentionMetadata(
        num_tokens=num_tokens, slot_mapping=16 + torch.arange(num_tokens, device=DEVICE),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([[1, 2]], dtype=torch.int32, device=DEVICE),
        max_query_len=num_tokens, max_seq_len=num_tokens, query_lens_cpu=[num_tokens],
        seq_lens_cpu=[num_tokens])
    quantized = []  # the norms and the activation that quantized for their products
    for cls in (RMSNorm, type(layer.mlp.act)):
        original = cls.quantized
        monkeypatch.setattr(cls, "quantized", lambda self, *a, f=original: (
            quantized.append(type(self).__name__), f(self, *a))[1])
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(LinearBase, "takes_fp8_rows",
                            lambda self, x, on=fused: on and self.method.takes_fp8_rows(x))
        backend = TorchAttentionBackend()
        backend.prepare(metadata, 16)
        caches = [torch.zeros(2, 3, 16, 2, arch.head_dim, device=DEVICE, dtype=torch.bfloat16)]
        with torch.no_grad(), forward_context(ForwardContext(metadata, caches, backend)):
            outs.append(layer(x, cos_sin, residual))
    assert quantized == ["RMSNorm", "RMSNorm", "SiluAndMul"]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("kernels", [False, True])
def test_gemma_norm_quantizes_its_own_output(kernels: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma's norm (a float32 1 + weight scale) has no FP8 epilogue: ``quantized`` quantizes
    what ``forward`` gives, on either path."""
    monkeypatch.setattr(dispatch, "use_triton", lambda x: kernels)
    norm = GemmaRMSNorm(64).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = (randn(5, 64, dtype=torch.bfloat16, seed=s) for s in (1, 2))
    rows, stream = norm.quantized(x, residual)
    plain, plain_stream = norm(x, residual)
    assert torch.equal(stream, plain_stream)
    assert torch.equal(rows.values.view(torch.uint8), fp8_rows(plain).values.view(torch.uint8))
