"""The Llama-family decoder: Llama (SmolLM2), Mistral (sliding window), Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm).

One implementation, switched by ``ModelArch`` flags, since these differ only there; families
whose layers differ in shape (Gemma 2, Phi-3) subclass the pieces here in a file of their own.
Checkpoint names are Hugging Face's; q/k/v and gate/up load into merged matrices (one matmul each).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.distributed.parallel_state import tp_size
from pagedllm.layers.activation import gated_activation
from pagedllm.layers.attention import Attention
from pagedllm.layers.linear import ColumnParallelLinear, LinearBase, RowParallelLinear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization.fp8 import Fp8Rows
from pagedllm.layers.rotary import (
    MRotaryEmbedding,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_qk,
)
from pagedllm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.arch import ModelArch


class DecoderAttention(nn.Module):
    """``norm``: the q/k norm's class (Gemma 3 scales by 1 + weight).

    With tensor parallelism a rank computes its share of the query heads and of the KV heads
    (a KV head is replicated over ``ranks / num_kv_heads`` ranks when there are fewer heads than
    ranks); ``o_proj`` all-reduces the ranks' partial outputs."""

    def __init__(self, arch: ModelArch, layer_idx: int, norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.arch = arch
        ranks = tp_size()
        self.num_heads = arch.num_heads // ranks
        self.num_kv_heads = arch.kv_heads_per_rank(ranks)
        self.q_size = self.num_heads * arch.head_dim
        self.kv_size = self.num_kv_heads * arch.head_dim
        kv_replicas = max(1, ranks // arch.num_kv_heads)
        self.qkv_proj = ColumnParallelLinear(
            arch.hidden_size, [arch.q_size, arch.kv_size, arch.kv_size], bias=arch.qkv_bias,
            replicas=[1, kv_replicas, kv_replicas])
        self.o_proj = RowParallelLinear(arch.q_size, arch.hidden_size)
        if arch.qk_norm:
            self.q_norm = norm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = norm(arch.head_dim, arch.rms_norm_eps)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, arch.head_dim,
                              arch.attention_scale, arch.sliding_window(layer_idx),
                              arch.attn_logit_softcap)

    def forward(self, x: torch.Tensor | Fp8Rows,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a = self.arch
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(-1, self.num_kv_heads, a.head_dim)  # [T, Hkv, D]
        if a.qk_norm:
            q, k = qkv[:, :qk_size].split([self.q_size, self.kv_size], dim=-1)
            q = self.q_norm(q.view(-1, self.num_heads, a.head_dim))  # [T, H, D]
            k = self.k_norm(k.view(-1, self.num_kv_heads, a.head_dim))  # [T, Hkv, D]
            q, k = apply_rotary(q, k, cos_sin)
        else:  # q's heads and k's are adjacent in qkv: rotated together
            qk = qkv[:, :qk_size].view(-1, self.num_heads + self.num_kv_heads, a.head_dim)
            q, k = apply_rotary_qk(qk, self.num_heads, cos_sin)
        return self.o_proj(self.attn(q, k, v))


class DecoderMLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [inter, inter])
        self.act = gated_activation(arch.hidden_act)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        h = self.gate_up_proj(x)
        return self.down_proj(self.act.quantized(h) if self.down_proj.takes_fp8_rows(h)
                              else self.act(h))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = DecoderAttention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = self.make_mlp(arch, layer_idx)

    def make_mlp(self, arch: ModelArch, layer_idx: int) -> nn.Module:
        """The layer's MLP: [T, hidden] -> [T, hidden] (a sparse decoder routes to experts)."""
        return DecoderMLP(arch)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried beside x, so each residual add is fused into the norm
        after it: returns (MLP output, residual before it), which the next layer's input norm (or
        the final norm) adds. ``residual`` is None at the first layer, whose x is the stream."""
        h, residual = add_norm(self.input_layernorm, x, residual, self.self_attn.qkv_proj)
        h, residual = add_norm(self.post_attention_layernorm, self.self_attn(h, cos_sin),
                               residual, getattr(self.mlp, "gate_up_proj", None))
        return self.mlp(h), residual


def add_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
             consumer: nn.Module | None) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """(norm(x + residual), x + residual), or (norm(x), x) without a residual; the normalized
    rows come quantized (``Fp8Rows``) when ``consumer``, the linear layer they feed, multiplies in
    FP8, so the norm's kernel does the quantizing."""
    if isinstance(consumer, LinearBase) and consumer.takes_fp8_rows(x):
        return norm.quantized(x, residual)
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class DecoderModel(nn.Module):
    """A family that differs in its layers or norms names them in ``layer_class`` and
    ``norm_class``."""

    layer_class: type[nn.Module] = DecoderLayer
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(arch, i) for i in range(arch.num_layers))
        self.norm = self.norm_class(arch.hidden_size, arch.rms_norm_eps)
        rotary_dim = arch.rotary_dim or arch.head_dim
        if arch.mrope_section is None:
            self.rotary = RotaryEmbedding(rotary_dim, arch.max_position_embeddings,
                                          arch.rope_theta, arch.rope_scaling)
        else:
            self.rotary = MRotaryEmbedding(rotary_dim, arch.max_position_embeddings,
                                           arch.rope_theta, arch.mrope_section,
                                           arch.rope_scaling)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden]."""
        return self.embed_tokens(input_ids)

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype,
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (cos, sin) of the step's positions: one table shared by all here."""
        return [self.rotary(positions, dtype)] * len(self.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """positions: [T], or [3, T] with M-RoPE; ``inputs_embeds`` [T, hidden] replace the
        token embeddings (a multimodal model has put image features in them)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer, cos_sin in zip(self.layers, self.rotary_tables(positions, x.dtype)):
            x, residual = layer(x, cos_sin, residual)
        return self.norm(x, residual)[0]


# HF checkpoint name piece -> (our merged parameter piece, shard index)
_MERGED = {
    ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}


_NUM_PIECES = Counter(merged for merged, _ in _MERGED.values())  # merged name -> pieces


class DecoderForCausalLM(nn.Module):
    model_class: type[DecoderModel] = DecoderModel

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = self.model_class(arch)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.lm_head(hidden).float()

    def checkpoint_params(self) -> dict[str, nn.Parameter]:
        """The parameters ``load_weights`` fills by name (a subclass that loads some of its own,
        as the MoE experts, leaves those out)."""
        return dict(self.named_parameters(remove_duplicate=False))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = self.checkpoint_params()
        loaded: set[tuple[str, int]] = set()  # (parameter, piece of a merged matrix)
        for name, tensor in weights:
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if "rotary_emb.inv_freq" in name:
                continue
            shard = 0
            for piece, (merged, shard_id) in _MERGED.items():
                if piece in name:
                    name, shard = name.replace(piece, merged), shard_id
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in "
                                 f"{type(self).__name__}")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is None:
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor, shard)
            loaded.add((name, shard))
        # A merged matrix needs every one of its pieces (q, k and v; gate and up).
        expected = {(n, s) for n in params
                    for s in range(next((c for m, c in _NUM_PIECES.items() if m in n), 1))}
        missing = {n for n, _ in expected - loaded} - (
            {"lm_head.weight"} if self.arch.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint is missing parameters: {sorted(missing)[:8]}")
