"""Maps a config's ``architectures[0]`` to the pagedllm model class that implements it."""

from __future__ import annotations

import importlib

from torch import nn

from pagedllm.models.arch import ModelArch

# architecture name -> (module, class); imported on first use
_MODELS: dict[str, tuple[str, str]] = {
    "Gemma2ForCausalLM": ("pagedllm.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("pagedllm.models.gemma3", "Gemma3ForCausalLM"),
    "LlamaForCausalLM": ("pagedllm.models.llama", "DecoderForCausalLM"),
    "MistralForCausalLM": ("pagedllm.models.llama", "DecoderForCausalLM"),
    "MixtralForCausalLM": ("pagedllm.models.moe", "MoeForCausalLM"),
    "Phi3ForCausalLM": ("pagedllm.models.phi3", "Phi3ForCausalLM"),
    "Qwen2ForCausalLM": ("pagedllm.models.llama", "DecoderForCausalLM"),
    "Qwen3ForCausalLM": ("pagedllm.models.llama", "DecoderForCausalLM"),
    "Qwen3MoeForCausalLM": ("pagedllm.models.moe", "MoeForCausalLM"),
    "Qwen2VLForConditionalGeneration": ("pagedllm.models.qwen2_vl",
                                        "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("pagedllm.models.qwen2_5_vl",
                                           "Qwen2_5_VLForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(arch: ModelArch) -> type[nn.Module]:
    if arch.architecture not in _MODELS:
        raise ValueError(f"Model architecture {arch.architecture!r} is not supported. "
                         f"Supported: {', '.join(supported_architectures())}")
    module, name = _MODELS[arch.architecture]
    return getattr(importlib.import_module(module), name)
