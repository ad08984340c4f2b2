"""Linear layers that know their tensor-parallel shard.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (followed by an all-reduce). Each parameter carries a ``weight_loader`` that copies the
rank's slice of a checkpoint tensor (and, for merged layers, into the right sub-block), so
checkpoints load the same way at any world size. The rank and world size come from
``distributed.parallel_state`` when the layer is built. The product itself is the layer's
``method`` (``layers.quantization``): the plain one until a quantization method takes over.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.parallel_state import all_reduce, tp_rank, tp_size
from pagedllm.layers.quantization import UNQUANTIZED, LinearMethod
from pagedllm.layers.quantization.fp8 import Fp8Rows


def set_weight_loader(param: nn.Parameter, fn) -> nn.Parameter:
    param.weight_loader = fn  # type: ignore[attr-defined]
    return param


class LinearBase(nn.Module):
    """``weight`` [out, in] (this rank's shard), optional ``bias`` and the product's method."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.method: LinearMethod = UNQUANTIZED

    def takes_fp8_rows(self, x: torch.Tensor) -> bool:
        """Whether the product quantizes x per token to FP8: the layer before may then hand it
        ``Fp8Rows`` (``LinearMethod.takes_fp8_rows``)."""
        return self.method.takes_fp8_rows(x)

    def matmul(self, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        return self.method.apply(self, x, bias)


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W's rows (outputs) split into ``output_sizes`` blocks, each sharded.

    ``replicas[i]`` ranks hold the same slice of block i (1: every rank its own). Grouped-query
    attention's K and V blocks are replicated this way when there are more ranks than KV heads.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 replicas: list[int] | None = None) -> None:
        super().__init__()
        replicas = replicas or [1] * len(output_sizes)
        self.slice_index, self.shard_sizes = [], []
        for size, copies in zip(output_sizes, replicas):
            slices = self.tp_size // copies
            if self.tp_size % copies or size % slices:
                raise ValueError(f"an output block of {size} rows does not split over "
                                 f"{self.tp_size} ranks ({copies} per slice)")
            self.slice_index.append(self.tp_rank // copies)
            self.shard_sizes.append(size // slices)
        out = sum(self.shard_sizes)
        self.weight = set_weight_loader(nn.Parameter(torch.empty(out, input_size)), self._load)
        self.bias = set_weight_loader(nn.Parameter(torch.empty(out)), self._load) if bias \
            else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        piece = loaded.narrow(0, self.slice_index[shard_id] * size, size)
        param.data.narrow(0, offset, size).copy_(piece)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return self.matmul(x, self.bias)


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_shard W_shard^T) + b, W's columns (inputs) split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        if input_size % self.tp_size:
            raise ValueError(f"{input_size} input columns do not split over {self.tp_size} "
                             "ranks")
        self.shard = input_size // self.tp_size
        self.weight = set_weight_loader(nn.Parameter(torch.empty(output_size, self.shard)),
                                        self._load)
        self.bias = set_weight_loader(nn.Parameter(torch.empty(output_size)),
                                      self._load_bias) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        # this rank's columns, counted in the parameter's own units (elements, or the bytes of
        # the quantized blocks an int4 layer loads: Int4LinearMethod.create_weights)
        width = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * width, width))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        y = all_reduce(self.matmul(x, None))  # the partial sums, then the bias once
        return y if self.bias is None else y + self.bias
