"""Mixture-of-experts decoders: Mixtral (``MixtralForCausalLM``) and Qwen3-MoE
(``Qwen3MoeForCausalLM``).

Both are the Llama decoder (Qwen3-MoE with Qwen3's q/k norms, read from ``ModelArch``) whose
MLP is, in its sparse layers, a router and ``num_experts`` gated MLPs (``layers.fused_moe``).
The families differ only in numbers ``MoeArch`` reads (renormalized top-k weights, their
rounding, which layers are sparse) and in checkpoint names, mapped here:

- Mixtral: ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up,
  down); Qwen3-MoE: ``mlp.gate`` and ``mlp.experts.{e}.gate_proj/up_proj/down_proj``;
- either, as transformers 5 holds them (``save_original_format=False``): ``mlp.gate`` and the
  grouped ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.layers.fused_moe import FusedMoE
from pagedllm.models.arch import ModelArch
from pagedllm.models.llama import DecoderForCausalLM, DecoderLayer, DecoderMLP, DecoderModel

# one expert's matrix: (prefix ".mlp.experts", expert, HF piece name)
_PER_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)"
                         r"\.weight")
_GROUPED = re.compile(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)")
# HF piece -> (our grouped parameter, shard id: gate 0, up 1 of w13)
_PIECES = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
           "w2": ("w2", 0), "down_proj": ("w2", 0)}


class SparseMoeBlock(nn.Module):
    """[T, hidden] -> [T, hidden]: the router's logits pick each token's experts."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        moe = arch.moe
        assert moe is not None
        if arch.hidden_act != "silu":
            raise ValueError(f"MoE experts with activation {arch.hidden_act!r} are not "
                             "supported; pagedllm's experts are gated SiLU.")
        self.gate = nn.Linear(arch.hidden_size, moe.num_experts, bias=False)
        self.experts = FusedMoE(moe.num_experts, moe.top_k, arch.hidden_size,
                                moe.intermediate_size, moe.renormalize, moe.round_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))  # router logits [T, E] in the model dtype


class MoeDecoderLayer(DecoderLayer):
    def make_mlp(self, arch: ModelArch, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(arch) if arch.is_sparse(layer_idx) else DecoderMLP(arch)


class MoeDecoderModel(DecoderModel):
    layer_class = MoeDecoderLayer


class MoeForCausalLM(DecoderForCausalLM):
    model_class = MoeDecoderModel

    def checkpoint_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in super().checkpoint_params().items() if ".experts." not in n}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Experts load here, piece by piece into their grouped tensors; the rest (attention,
        norms, routers, dense MLPs) by the Llama loader."""
        assert self.arch.moe is not None
        experts = range(self.arch.moe.num_experts)
        loaded: set[tuple[str, int, int]] = set()  # (parameter, shard id, expert)
        super().load_weights(self._load_experts(weights, experts, loaded))
        expected = {(name, shard, e) for name, _ in self.named_parameters() if ".experts." in name
                    for shard in range(2 if name.endswith(".w13") else 1) for e in experts}
        missing = sorted({n for n, _, _ in expected - loaded})
        if missing:
            raise ValueError(f"checkpoint is missing expert weights of: {missing[:8]}")

    def _load_experts(self, weights: Iterable[tuple[str, torch.Tensor]], experts: range,
                      loaded: set[tuple[str, int, int]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Loads the expert tensors of ``weights`` (recording each (parameter, shard, expert)
        in ``loaded``) and yields the others, Mixtral's names mapped to ``.mlp.``."""
        params = dict(self.named_parameters())
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            split = _expert_pieces(name, tensor)
            if split is None:
                yield name, tensor
                continue
            param_name, pieces = split
            if param_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in "
                                 f"{type(self).__name__}")
            param = params[param_name]
            with torch.no_grad():
                for shard, expert, piece in pieces:
                    param.weight_loader(param, piece, shard, expert)  # type: ignore[attr-defined]
                    loaded.update((param_name, shard, e)
                                  for e in (experts if expert is None else (expert,)))


def _expert_pieces(name: str, tensor: torch.Tensor,
                   ) -> tuple[str, list[tuple[int, int | None, torch.Tensor]]] | None:
    """An expert checkpoint tensor as (our grouped parameter's name, [(shard id, expert or None
    for all, tensor)]); None for any other tensor."""
    if match := _PER_EXPERT.fullmatch(name):
        prefix, expert, hf_piece = match.groups()
        param, shard = _PIECES[hf_piece]
        return f"{prefix}.{param}", [(shard, int(expert), tensor)]
    if match := _GROUPED.fullmatch(name):
        prefix, hf_piece = match.groups()
        if hf_piece == "down_proj":  # [E, H, I]
            return f"{prefix}.w2", [(0, None, tensor)]
        gate, up = tensor.chunk(2, dim=1)  # [E, 2I, H]: each expert's gate rows, then up rows
        return f"{prefix}.w13", [(0, None, gate), (1, None, up)]
    return None
