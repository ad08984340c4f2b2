"""The fused RMSNorm, rotary and SiLU-and-mul kernels equal the torch layers they replace.

The torch code of ``layers/`` is the reference (it is the CPU path). q and k are strided views of
a fused qkv projection output, as the model hands them over. On the CPU, Triton's interpreter
rounds to 16-bit floats by truncation, not to nearest as torch does, so 16-bit results may
differ by an ulp or two per rounding step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from pagedllm.kernels.rms_norm import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from pagedllm.kernels.rotary import rotary_triton  # noqa: E402
from pagedllm.layers import dispatch  # noqa: E402
from pagedllm.layers.activation import SiluAndMul  # noqa: E402
from pagedllm.layers.norm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402
from pagedllm.models.arch import ModelArch  # noqa: E402
from pagedllm.models.registry import model_class  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def make_norm(width: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(width, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(width, dtype=dtype, seed=seed + 1))
    return norm


def reference(layer: Callable[..., Any], *args: Any) -> Any:
    """The layer's torch path, whatever the device."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "use_triton", lambda x: False)
        return layer(*args)


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("width", [64, 96, 128, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(num_tokens: int, width: int, dtype: torch.dtype) -> None:
    norm = make_norm(width, dtype, seed=width)
    x = randn(num_tokens, width, dtype=dtype, seed=num_tokens) * 3
    assert_close(rms_norm_triton(x, norm.weight, norm.eps), reference(norm, x))


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("width", [64, 96, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(num_tokens: int, width: int, dtype: torch.dtype) -> None:
    norm = make_norm(width, dtype, seed=width)
    # x is a strided view (the right half of wider rows): only the last dim must be contiguous.
    x = randn(num_tokens, 2 * width, dtype=dtype, seed=num_tokens)[:, width:]
    residual = randn(num_tokens, width, dtype=dtype, seed=num_tokens + 1) * 4
    before = x.clone(), residual.clone()
    out, new_residual = add_rms_norm_triton(x, residual, norm.weight, norm.eps)
    want_out, want_residual = reference(norm, x, residual)
    assert_close(out, want_out)
    assert_close(new_residual, want_residual)
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1]), "inputs modified"


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (6, 1, 64)])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_on_qkv_views(num_heads: int, num_kv_heads: int, head_dim: int,
                              num_tokens: int, dtype: torch.dtype) -> None:
    q, k, _ = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=head_dim)
    for x in (q, k):
        norm = make_norm(head_dim, dtype, seed=x.shape[1])
        assert_close(rms_norm_triton(x, norm.weight, norm.eps), reference(norm, x))


def test_rms_norm_promotes_like_the_reference() -> None:
    norm = make_norm(96, torch.float32, seed=0)  # fp32 weight, bf16 activations
    x = randn(5, 96, dtype=torch.bfloat16, seed=1)
    out = rms_norm_triton(x, norm.weight, norm.eps)
    assert out.dtype == torch.float32
    tol = TOLERANCE[torch.bfloat16]  # the normed row is rounded to bfloat16 first
    torch.testing.assert_close(out, reference(norm, x), rtol=tol, atol=tol)
    assert rms_norm_triton(x[:0], norm.weight, norm.eps).shape == (0, 96)


def qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q [T, H, D], k and v [T, Hkv, D] as strided views of one fused projection output."""
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = randn(num_tokens, sum(sizes), dtype=dtype, seed=seed)
    q, k, v = qkv.split(sizes, dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


# (num_heads, num_kv_heads, head_dim, num_tokens): MHA, GQA (Llama-3.2-1B's 32/8), MQA with a
# head_dim whose half is not a power of two; 64 tokens only twice, as the interpreter is slow.
ROTARY_CASES = [(h, kv, d, t) for h, kv, d in [(4, 4, 64), (8, 2, 128), (32, 8, 64), (6, 1, 96)]
                for t in (1, 7)] + [(8, 2, 128, 64), (6, 1, 96, 64)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,num_tokens", ROTARY_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_qkv_views(num_heads: int, num_kv_heads: int, head_dim: int, num_tokens: int,
                             dtype: torch.dtype) -> None:
    q, k, _ = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=num_tokens)
    before = q.clone(), k.clone()
    rotary = RotaryEmbedding(head_dim, max_position=4096, base=10000.0).to(DEVICE)
    positions = torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(0))
    cos_sin = rotary(positions.to(DEVICE), dtype)  # [T, 1, D] each
    want_q, want_k = reference(apply_rotary, q, k, cos_sin)
    out_q, out_k = rotary_triton(q, k, *cos_sin)
    assert_close(out_q, want_q)
    assert_close(out_k, want_k)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1]), "inputs modified"


def test_rotary_reads_any_cos_sin_table() -> None:
    # Unrelated halves (unlike RoPE's duplicated ones) and [T, D] rows: each element is used.
    q, k, _ = qkv_views(7, 4, 2, 64, torch.float32, seed=3)
    cos, sin = randn(7, 64, dtype=torch.float32, seed=4), randn(7, 64, dtype=torch.float32, seed=5)
    want_q, want_k = reference(apply_rotary, q, k, (cos[:, None], sin[:, None]))
    out_q, out_k = rotary_triton(q, k, cos, sin)
    assert_close(out_q, want_q)
    assert_close(out_k, want_k)


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("inter", [64, 96, 1536, 2100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(num_tokens: int, inter: int, dtype: torch.dtype) -> None:
    x = randn(num_tokens, 2 * inter, dtype=dtype, seed=inter) * 3
    assert_close(silu_and_mul_triton(x), reference(SiluAndMul(), x))


def test_silu_and_mul_on_a_row_strided_view() -> None:
    x = randn(9, 3 * 80, dtype=torch.bfloat16, seed=2)[:, :160]
    assert_close(silu_and_mul_triton(x), reference(SiluAndMul(), x))


ARCHS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64},
    # (1 + weight) norms with a float32 scale, four a layer; GELU-tanh; a 4-token window
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
               "attn_logit_softcapping": 5.0, "sliding_window": 4},
    # Phi-4-mini's partial rotary: 18 of 24 dims rotated, through strided views
    "phi4-mini": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                  "num_attention_heads": 4, "num_key_value_heads": 2,
                  "partial_rotary_factor": 0.75},
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_decoder_with_kernels_matches_torch_path(name: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer-level dispatch: the whole decoder (fused add+norm, q/k norm, rotary, SiLU-and-mul,
    the residual carried between layers) gives what the torch path gives."""
    arch = ModelArch.from_hf_config({
        "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2, "vocab_size": 50,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, **ARCHS[name]})
    torch.manual_seed(0)
    model = model_class(arch)(arch).model.to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    # Two fresh prompts, 5 and 3 tokens, in blocks 1 and 2 of a 16-slot block cache.
    block_size, lens = 16, [5, 3]
    ids = torch.randint(0, arch.vocab_size, (sum(lens),), device=DEVICE)
    positions = torch.cat([torch.arange(n) for n in lens]).to(DEVICE)
    slots = torch.cat([(r + 1) * block_size + torch.arange(n) for r, n in enumerate(lens)])
    metadata = AttentionMetadata(
        num_tokens=sum(lens), slot_mapping=slots.to(DEVICE),
        query_start_loc=torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([[1], [2]], dtype=torch.int32, device=DEVICE),
        max_query_len=5, max_seq_len=5, query_lens_cpu=lens, seq_lens_cpu=lens)
    outs = []
    for triton_layers in (False, True):
        monkeypatch.setattr(dispatch, "use_triton", lambda x, on=triton_layers: on)
        backend = TorchAttentionBackend()
        backend.prepare(metadata, block_size)
        caches = [torch.zeros(2, 3, block_size, arch.num_kv_heads, arch.head_dim, device=DEVICE)
                  for _ in range(arch.num_layers)]
        with torch.no_grad(), forward_context(ForwardContext(metadata, caches, backend)):
            outs.append(model(ids, positions))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
