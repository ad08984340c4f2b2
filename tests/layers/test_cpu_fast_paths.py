"""The CPU's fused spellings of rotary and RMSNorm give the bits of their reference spellings.

The rotation swaps a head's halves with one flip and negates the first in place (the reference:
``x * cos + rotate_half(x) * sin``, transformers'), and rotates q and k in one call when they are
adjacent views of the fused qkv output. A float32 RMSNorm is torch's ``rms_norm`` (the reference:
normalize in float32, cast back, scale). Each is compared on random data for equality, not
closeness: the float32 path is the exact reference the engine tests hold against transformers.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import (
    RotaryEmbedding,
    _rotate,
    _rotate_half,
    apply_rotary,
    apply_rotary_qk,
)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,heads,head_dim", [(1, 9, 64), (7, 3, 64), (5, 2, 96)])
def test_rotation_equals_rotate_half(num_tokens: int, heads: int, head_dim: int,
                                     dtype: torch.dtype) -> None:
    x = randn(num_tokens, heads, head_dim, seed=head_dim, dtype=dtype)
    # Unrelated halves (RoPE's are equal): every element of cos and sin is used.
    cos, sin = (randn(num_tokens, 1, head_dim, seed=s, dtype=dtype) for s in (1, 2))
    before = x.clone()
    assert torch.equal(_rotate(x, cos, sin), x * cos + _rotate_half(x) * sin)
    assert torch.equal(x, before), "input modified"


@pytest.mark.parametrize("num_tokens", [1, 6])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # 32: partial rotary, the generic path
def test_rotary_qk_on_a_qkv_view_equals_apply_rotary(num_tokens: int, rotary_dim: int) -> None:
    heads, kv_heads, head_dim = 9, 3, 64
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, seed=num_tokens)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(num_tokens, heads + kv_heads, head_dim)
    rotary = RotaryEmbedding(rotary_dim, max_position=512, base=10000.0)
    cos_sin = rotary(torch.tensor([3, 100, 511, 0, 7, 8][:num_tokens]), torch.float32)
    q, k = apply_rotary_qk(qk, heads, cos_sin)
    want_q, want_k = apply_rotary(qk[:, :heads], qk[:, heads:], cos_sin)
    assert q.shape == want_q.shape and k.shape == want_k.shape
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    cos, sin = cos_sin  # and both equal transformers' spelling
    if rotary_dim == head_dim:
        assert torch.equal(q, qk[:, :heads] * cos + _rotate_half(qk[:, :heads]) * sin)


@pytest.mark.parametrize("shape", [(1, 576), (13, 576), (4, 3, 64)])  # rows; q/k norm heads
@pytest.mark.parametrize("with_residual", [False, True])
def test_float32_rms_norm_equals_reference(shape: tuple[int, ...], with_residual: bool) -> None:
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(shape[-1], seed=0) + 1)
    x, residual = randn(*shape, seed=1) * 3, randn(*shape, seed=2)
    if with_residual:
        out, stream = norm(x, residual)
        assert torch.equal(stream, x + residual)
        assert torch.equal(out, norm._norm_ref(x + residual))
    else:
        assert torch.equal(norm(x), norm._norm_ref(x))


def test_other_dtypes_keep_the_reference_norm() -> None:
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    x = randn(3, 64, seed=4, dtype=torch.bfloat16)
    assert torch.equal(norm(x), norm._norm_ref(x))
