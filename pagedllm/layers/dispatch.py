"""Which implementation a layer runs: fused Triton kernels on CUDA, the torch code elsewhere.

The torch code is the CPU path and the reference the kernels are tested against; the kernel
tests force the Triton path on CPU tensors (Triton's interpreter) by patching ``use_triton``,
so layers call it through this module (``dispatch.use_triton(x)``), not a copied name.
"""

from __future__ import annotations

import torch


def use_triton(x: torch.Tensor) -> bool:
    """True for CUDA tensors. Layers import their kernel only then: Triton is GPU-only."""
    return x.is_cuda
