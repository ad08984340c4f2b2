"""Linear layers that know their tensor-parallel shard.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (followed by an all-reduce). Each parameter carries a ``weight_loader`` that copies the
rank's slice of a checkpoint tensor (and, for merged layers, into the right sub-block), so
checkpoints load the same way at any world size. pagedllm runs one rank today: the slicing is
exercised with ``tp_rank=0, tp_size=1`` and the all-reduce is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _loader(param: nn.Parameter, fn) -> nn.Parameter:
    param.weight_loader = fn  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (outputs) split into ``output_sizes`` blocks, each sharded."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        assert all(size % tp_size == 0 for size in output_sizes)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.shard_sizes = [size // tp_size for size in output_sizes]
        out = sum(self.shard_sizes)
        self.weight = _loader(nn.Parameter(torch.empty(out, input_size)), self._load)
        self.bias = _loader(nn.Parameter(torch.empty(out)), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        piece = loaded.narrow(0, self.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b, W's columns (inputs) split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        assert input_size % tp_size == 0
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.shard = input_size // tp_size
        self.weight = _loader(nn.Parameter(torch.empty(output_size, self.shard)), self._load)
        self.bias = _loader(nn.Parameter(torch.empty(output_size)), self._load_bias) if bias \
            else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        param.data.copy_(loaded.narrow(1, self.tp_rank * self.shard, self.shard))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With tp_size > 1 the partial sums are all-reduced here (and the bias added once).
        return F.linear(x, self.weight, self.bias)
