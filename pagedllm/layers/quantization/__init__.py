"""How linear layers store and multiply their weights: unquantized, or a quantization method.

A ``LinearMethod`` owns a linear layer's matmul. Layers are built and loaded in the model dtype
(each rank with its shard); ``quantize_model`` then hands every linear layer to the method named
by ``--quantization``, which may repack the weight (``process_weights_after_loading``) and runs
the layer's product from then on (``apply``). Methods register themselves in ``METHODS``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """The plain product in the model dtype; the base of quantized methods."""

    name = "unquantized"
    # The method (a METHODS name) that takes over the LM head; None leaves it in the model dtype.
    lm_head: str | None = None

    def create_weights(self, layer: nn.Module) -> None:
        """Before loading a checkpoint already in this format: lays out the layer's parameters
        as the checkpoint stores them (the unquantized method keeps the model dtype's)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repacks ``layer.weight`` once loading is done (the unquantized method keeps it)."""

    def takes_fp8_rows(self, x: torch.Tensor) -> bool:
        """Whether ``apply`` quantizes x per token to FP8 (``fp8.Fp8Rows``): the kernel
        before the layer may then hand over x quantized in its epilogue."""
        return False

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = LinearMethod()

# --quantization name -> method class (filled by the method modules)
METHODS: dict[str, type[LinearMethod]] = {}


def _method(name: str) -> LinearMethod:
    if name not in METHODS:
        raise ValueError(f"quantization {name!r} is not supported; pagedllm supports "
                         f"{sorted(METHODS)}")
    return METHODS[name]()


def _linear_layers(model: nn.Module) -> list[nn.Module]:
    from pagedllm.layers.linear import LinearBase

    return [m for m in model.modules() if isinstance(m, LinearBase)]


def create_quantized_weights(model: nn.Module, name: str) -> None:
    """Before loading a checkpoint quantized with method ``name``: every linear layer's
    parameters laid out as that checkpoint stores them (``LinearMethod.create_weights``)."""
    method = _method(name)
    for module in _linear_layers(model):
        method.create_weights(module)


def quantize_model(model: nn.Module, name: str | None) -> None:
    """Hands every linear layer of ``model`` to the method ``name`` (None: leaves them)."""
    if name is None:
        return
    method = _method(name)
    jobs = [(module, method) for module in _linear_layers(model)]
    lm_head = getattr(model, "lm_head", None)
    if method.lm_head is not None and lm_head is not None:
        jobs.insert(0, (lm_head, _method(method.lm_head)))  # the largest first
    # Each job changes only its own layer, and torch's kernels release the GIL: on threads,
    # the CPU's cores share the repacking (~1 of 2 cores was busy at start-up). On a GPU, one
    # thread (the jobs launch Triton kernels, whose first compiles are not shared across
    # threads).
    on_cpu = next(model.parameters()).device.type == "cpu"
    with ThreadPoolExecutor((os.cpu_count() or 1) if on_cpu else 1) as pool:
        list(pool.map(lambda job: job[1].process_weights_after_loading(job[0]), jobs))
    for module, module_method in jobs:
        module.method = module_method


# The method modules register themselves in METHODS when imported.
from pagedllm.layers.quantization import fp8, int_weight_only  # noqa: E402, F401
