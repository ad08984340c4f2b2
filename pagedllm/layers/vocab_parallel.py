"""The token embedding and the LM head, split over the vocabulary.

Rank r holds rows [r * n, (r + 1) * n) of the [vocab, hidden] matrix, n = ceil(vocab / ranks)
(the last rank's tail is zero padding). The embedding looks up the ids in its range and an
all-reduce adds the ranks' rows; the LM head's partial logits are gathered and the padding cut.
With one rank both are the plain lookup and product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size
from pagedllm.layers.linear import set_weight_loader
from pagedllm.layers.quantization import UNQUANTIZED, LinearMethod


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size, self.tp_size = vocab_size, tp_size()
        self.rows = -(-vocab_size // self.tp_size)
        self.start = tp_rank() * self.rows
        self.weight = set_weight_loader(nn.Parameter(torch.empty(self.rows, hidden_size)),
                                        self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        piece = loaded[self.start:self.start + self.rows]
        param.data[:len(piece)].copy_(piece)
        param.data[len(piece):].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, hidden] -> logits [N, vocab] on every rank (the weight may be the embedding's).

    The product is ``method``'s, as a linear layer's (a weight-only method may take it over)."""

    method: LinearMethod = UNQUANTIZED

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(self.method.apply(self, hidden, None))
        return logits if self.tp_size == 1 else logits[..., :self.vocab_size]
