"""The model's recommended sampling defaults (``generation_config.json``), as vLLM applies them.

With ``--generation-config auto`` (the default) the server's requests take the sampling fields
they leave unset from the model folder's ``generation_config.json``; ``vllm`` ignores the file;
any other value is a folder holding one. Only the fields SamplingParams knows are read, and
``max_new_tokens``, which becomes ``max_tokens``: a cap on every request's output (vLLM takes the
smallest of it, the request's ``max_tokens`` and the room left in the context).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pagedllm.models.loader.source import ModelSource

logger = logging.getLogger(__name__)

# generation_config.json field -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def default_sampling_params(source: ModelSource, setting: str) -> dict[str, Any]:
    """The defaults ``setting`` ("auto", "vllm" or a folder) gives: {} when there are none."""
    if setting == "vllm":
        return {}
    folder = source.path if setting == "auto" else setting
    path = os.path.join(folder, "generation_config.json")
    if setting == "auto" and (source.kind != "hf" or not os.path.isfile(path)):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--generation-config {setting}: cannot read {path}: {e}") from None
    defaults = {ours: config[theirs] for theirs, ours in _FIELDS.items()
                if config.get(theirs) is not None}
    if defaults:
        logger.info("Default sampling parameters from %s (the model's recommendation; "
                    "--generation-config vllm ignores them): %s", path, defaults)
    return defaults
