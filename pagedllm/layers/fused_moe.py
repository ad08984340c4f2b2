"""Mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` gated SiLU MLPs per token
and the token's output is their weighted sum.

The experts' weights are grouped tensors, so one kernel can index any expert:
``w13`` [E, 2I, H] (each expert's gate rows, then its up rows) and ``w2`` [E, H, I]. They are
tensor-parallel ready as the MLP linears are: a rank holds its slice of the intermediate
dimension I (gate/up rows, down columns), so its output is a partial sum that an all-reduce
completes. The router's weights are replicated.

The torch path is the CPU reference and follows transformers' arithmetic step by step (float32
routing, the weighted outputs of a token's k experts summed, then rounded); CUDA tensors run
the Triton kernels of ``pagedllm.kernels.fused_moe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import all_reduce, tp_rank, tp_size
from pagedllm.layers import dispatch


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, top_k] float32, expert ids [T, top_k] int64):
    softmax in float32 then top-k, as transformers; ``renormalize`` divides the k weights by
    their sum (Mixtral always, Qwen3-MoE with norm_topk_prob)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights and ids [T, k] -> [T, H].

    Each (token, slot) pair runs its expert's MLP (the pairs of one expert in one matmul), is
    scaled by its weight (float32 weights promote the product) and the k slots are summed, then
    rounded to x's dtype: transformers 5's default experts path (``grouped_mm``), so bfloat16
    rounds where transformers rounds."""
    num_tokens, top_k = ids.shape
    pair_ids = ids.flatten()  # [T * k]: pair p is token p // k, slot p % k
    y = torch.empty(num_tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)
    for expert in pair_ids.unique().tolist():
        pairs = torch.where(pair_ids == expert)[0]
        gate, up = F.linear(x[pairs // top_k], w13[expert]).chunk(2, dim=-1)
        y[pairs] = F.linear(F.silu(gate) * up, w2[expert])
    weighted = y * weights.reshape(-1, 1)  # [T * k, H]
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


class FusedMoE(nn.Module):
    """The routed experts of one sparse layer: (x [T, H], router logits [T, E]) -> [T, H]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, round_weights: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        if intermediate_size % self.tp_size:
            raise ValueError(f"the experts' intermediate size {intermediate_size} does not "
                             f"split over {self.tp_size} ranks")
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights
        self.shard = intermediate_size // self.tp_size  # this rank's intermediate columns
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.shard, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard))
        for param in (self.w13, self.w2):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0,
                      expert: int | None = None) -> None:
        """Copies this rank's slice of a checkpoint tensor into ``param``: one expert's
        ([I, H] gate (shard_id 0) or up (1), or [H, I] down) or, with ``expert`` None, all
        experts' at once ([E, I, H] / [E, H, I], transformers 5's grouped layout)."""
        target = param.data if expert is None else param.data[expert]
        if param is self.w13:  # gate or up: rows of the intermediate dimension
            piece = loaded.narrow(-2, self.tp_rank * self.shard, self.shard)
            target.narrow(-2, shard_id * self.shard, self.shard).copy_(piece)
        else:  # down: columns of the intermediate dimension
            target.copy_(loaded.narrow(-1, self.tp_rank * self.shard, self.shard))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        if self.round_weights:
            weights = weights.to(x.dtype)
        if dispatch.use_triton(x):
            from pagedllm.kernels.fused_moe import fused_experts_triton

            out = fused_experts_triton(x, self.w13, self.w2, weights, ids)
        else:
            out = fused_experts_reference(x, self.w13, self.w2, weights, ids)
        return all_reduce(out)  # the partial sums over the ranks' intermediate shards
