"""HF checkpoint folders: ``config.json`` and ``*.safetensors`` files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# FP8 checkpoints: weights stay float8 and their scales fp32 (a cast would change them).
_KEEP_DTYPE = (torch.float8_e4m3fn,)
_WEIGHT_SCALES = (".weight_scale",)
# Scales of activations (static per-tensor input scales) and of a calibrated KV cache: pagedllm
# quantizes activations per token and uses KV scales of 1.0, so these are skipped, with a note.
_UNUSED_SCALES = (".input_scale", ".output_scale", ".k_scale", ".v_scale")


def hf_config(folder: str) -> dict[str, Any]:
    """``config.json`` as it is written."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def safetensors_files(folder: str) -> list[str]:
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors files in {folder}. pagedllm loads HF checkpoints saved with "
            "safe_serialization=True (save_pretrained's default).")
    return files


def iter_hf_weights(folder: str, dtype: torch.dtype = torch.float32, skip_lm_head: bool = False,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in every safetensors file; floating tensors cast to dtype.

    ``skip_lm_head`` drops a stored ``lm_head.weight`` when the embeddings are tied, so callers
    see the same names whatever the checkpoint writer chose to store. FP8 weights and their
    ``weight_scale`` keep their stored dtypes; activation and KV-cache scales are skipped.
    """
    from safetensors import safe_open
    from tqdm import tqdm

    files = safetensors_files(folder)
    skipped: set[str] = set()
    for file in tqdm(files, desc="Loading safetensors", unit="file", disable=len(files) < 2):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if skip_lm_head and name == "lm_head.weight":
                    continue
                if name.endswith(_UNUSED_SCALES):
                    skipped.add(name.rsplit(".", 1)[1])
                    continue
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and tensor.dtype not in _KEEP_DTYPE and \
                        not name.endswith(_WEIGHT_SCALES):
                    tensor = tensor.to(dtype)
                yield name, tensor
    if skipped:
        logger.warning("Checkpoint scales not used: %s (activations are quantized per token, "
                       "an FP8 KV cache uses scales of 1.0)", ", ".join(sorted(skipped)))
