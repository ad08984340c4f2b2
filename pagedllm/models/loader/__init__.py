"""Model files -> config dict and HF-named weights (GGUF files and HF safetensors folders)."""

from pagedllm.models.loader.source import (
    DEFAULT_MODEL_NAME,
    ModelSource,
    default_model_path,
    iter_weights,
    load_hf_config,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelSource",
    "default_model_path",
    "iter_weights",
    "load_hf_config",
    "resolve_model",
]
