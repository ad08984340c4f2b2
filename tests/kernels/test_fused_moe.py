"""The Triton fused MoE equals the torch reference (``layers.fused_moe``) on random routing.

Shapes are tiny (Triton's CPU interpreter runs them): 8 experts, hidden 64, 32-48 intermediate
columns, top-2 and top-4, token counts that fill a block, leave padding and route no token to
some experts. 16-bit outputs may differ by a rounding step (the kernel scales the fp32
accumulator by the routing weight before rounding; the interpreter truncates).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import tests.kernels.test_fused_ops as fused_ops  # noqa: E402
from pagedllm.kernels.fused_moe import align_pairs_by_expert, fused_experts_triton  # noqa: E402
from pagedllm.layers import dispatch  # noqa: E402
from pagedllm.layers.fused_moe import FusedMoE, fused_experts_reference, route  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
NUM_EXPERTS, HIDDEN = 8, 64


def randn(*shape: int, dtype: torch.dtype, seed: int, std: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * std).to(DEVICE, dtype)


def routed(num_tokens: int, top_k: int, seed: int,
           skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and ids [T, k]; ``skew`` sends every token to experts 0-3 only."""
    logits = randn(num_tokens, NUM_EXPERTS, dtype=torch.float32, seed=seed)
    if skew:
        logits[:, 4:] = -1e4
    return route(logits, top_k, renormalize=True)


@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("block_m", [16, 64])
def test_alignment_puts_each_pair_once_in_a_block_of_its_expert(num_tokens: int,
                                                                block_m: int) -> None:
    _, ids = routed(num_tokens, 2, seed=num_tokens, skew=num_tokens == 33)
    sorted_pairs, block_experts = align_pairs_by_expert(ids, NUM_EXPERTS, block_m)
    num_pairs = ids.numel()
    assert sorted_pairs.numel() == block_experts.numel() * block_m
    blocks = sorted_pairs.view(-1, block_m).long().cpu()
    real = blocks < num_pairs
    assert sorted(blocks[real].tolist()) == list(range(num_pairs))
    experts = block_experts.long().cpu()
    pair_experts = ids.flatten().cpu()
    for block, expert, mask in zip(blocks, experts, real):
        if expert == NUM_EXPERTS:  # past the last expert's run: padding only
            assert not mask.any()
        else:
            assert (pair_experts[block[mask]] == expert).all()
    # expert runs in order, each at least one block long where the expert has pairs
    used = experts[experts < NUM_EXPERTS]
    assert (used.diff() >= 0).all() and set(used.tolist()) == set(ids.flatten().tolist())


@pytest.mark.parametrize(("num_tokens", "top_k", "inter"), [
    (1, 2, 32), (7, 2, 48), (33, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_equal_the_reference(num_tokens: int, top_k: int, inter: int,
                                           dtype: torch.dtype) -> None:
    x = randn(num_tokens, HIDDEN, dtype=dtype, seed=1)
    w13 = randn(NUM_EXPERTS, 2 * inter, HIDDEN, dtype=dtype, seed=2, std=0.2)
    w2 = randn(NUM_EXPERTS, HIDDEN, inter, dtype=dtype, seed=3, std=0.2)
    weights, ids = routed(num_tokens, top_k, seed=4, skew=num_tokens == 33)
    out = fused_experts_triton(x, w13, w2, weights, ids)
    expected = fused_experts_reference(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == expected.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def test_no_tokens() -> None:
    w13 = randn(NUM_EXPERTS, 64, HIDDEN, dtype=torch.float32, seed=2)
    w2 = randn(NUM_EXPERTS, HIDDEN, 32, dtype=torch.float32, seed=3)
    ids = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    out = fused_experts_triton(torch.zeros(0, HIDDEN, device=DEVICE), w13, w2,
                               torch.zeros(0, 2, device=DEVICE), ids)
    assert out.shape == (0, HIDDEN)


def test_layer_dispatches_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """FusedMoE with Qwen3-MoE's rounded bfloat16 weights: the Triton path equals the torch one."""
    layer = FusedMoE(NUM_EXPERTS, 2, HIDDEN, 32, renormalize=False, round_weights=True)
    with torch.no_grad():
        layer.w13.copy_(randn(NUM_EXPERTS, 64, HIDDEN, dtype=torch.float32, seed=5, std=0.2))
        layer.w2.copy_(randn(NUM_EXPERTS, HIDDEN, 32, dtype=torch.float32, seed=6, std=0.2))
    layer = layer.to(DEVICE, torch.bfloat16)
    x = randn(9, HIDDEN, dtype=torch.bfloat16, seed=7)
    logits = randn(9, NUM_EXPERTS, dtype=torch.bfloat16, seed=8)
    with torch.no_grad():
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
        expected = layer(x, logits)
        monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
        out = layer(x, logits)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


# fused_ops' decoder configs for the MoE families: 4 experts, top-2; Qwen3-MoE's first layer dense
MOE_ARCHS = {
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                  "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "mlp_only_layers": [0]},
}


@pytest.mark.parametrize("name", sorted(MOE_ARCHS))
def test_moe_decoder_with_kernels_matches_torch_path(name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused-ops decoder check (every layer's kernels against the torch path) on the MoE
    decoders."""
    monkeypatch.setitem(fused_ops.ARCHS, name, MOE_ARCHS[name])
    fused_ops.test_decoder_with_kernels_matches_torch_path(name, monkeypatch)
