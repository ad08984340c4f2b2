"""Gemma 2: the Llama decoder with Gemma's differences, and only those.

- embeddings scaled by sqrt(hidden_size) (rounded to the model's dtype, as transformers does);
- RMSNorm scaling by ``1 + weight``, and four norms a layer: before and after attention and
  before and after the MLP (the "after" norms act on the branch, before its residual add);
- a GELU-tanh gated MLP, scores scaled by ``query_pre_attn_scalar``, attention and final logits
  soft-capped, every other layer a sliding window: all read from ``ModelArch`` by the shared
  attention and MLP.

Checkpoint names are the Llama ones plus the two feed-forward norms, so loading is Llama's.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.norm import GemmaRMSNorm
from pagedllm.models.arch import ModelArch
from pagedllm.models.llama import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderMLP,
    DecoderModel,
    add_norm,
)


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = arch.hidden_size, arch.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = DecoderAttention(arch, layer_idx, GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = DecoderMLP(arch)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``DecoderLayer.forward``: returns (the MLP branch after its norm, the residual
        stream before it), the add left to the next norm."""
        x, residual = add_norm(self.input_layernorm, x, residual, None)
        x = self.post_attention_layernorm(self.self_attn(x, cos_sin))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2Model(DecoderModel):
    layer_class = Gemma2DecoderLayer
    norm_class = GemmaRMSNorm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_tokens.weight.shape[1] ** 0.5, dtype=x.dtype)


class Gemma2ForCausalLM(DecoderForCausalLM):
    model_class = Gemma2Model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32, soft-capped: c * tanh(logits / c)."""
        logits = super().compute_logits(hidden)
        cap = self.arch.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
