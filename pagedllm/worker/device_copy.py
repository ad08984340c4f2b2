"""Host-to-device copies that never make the host wait for the GPU.

A copy from ordinary (pageable) host memory returns only once the GPU has done it, and the GPU
does it after the step already queued; so preparing step N+1 would wait for step N to finish.
From pinned memory the copy is queued like a kernel and the host goes on.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if dtype is not None:
        tensor = tensor.to(dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
