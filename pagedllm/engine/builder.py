"""Engine start-up: find the model, load it, size the KV cache, wire the stages together."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.models.arch import ModelArch
from pagedllm.models.loader.source import ModelSource, iter_weights, load_hf_config, resolve_model
from pagedllm.models.registry import model_class
from pagedllm.tokenizer import load_tokenizer
from pagedllm.worker import memory
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def build_engine(cls: type, kwargs: dict[str, Any]) -> Any:
    start = time.perf_counter()
    source = resolve_model(kwargs.get("model"))
    arch = ModelArch.from_hf_config(load_hf_config(source))
    config = EngineConfig.create(arch.max_position_embeddings, **kwargs)
    device = torch.device(config.device.resolved())
    dtype = resolve_dtype(config.model.dtype, device)
    torch.manual_seed(config.model.seed)
    model = load_model(source, arch, config, device, dtype)
    tokenizer = load_tokenizer(source, config.model.chat_template)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("Loaded %s (%s, %.2f GiB of weights, %s on %s) in %.1f s", source.name,
                arch.architecture, weights / 2**30, dtype, device, time.perf_counter() - start)
    plan = memory.plan_kv_cache(arch, dtype, config.cache.block_size,
                                config.model.max_model_len, _kv_cache_bytes(config, device))
    memory.log_kv_cache_plan(plan, logger, device.type)
    backend = get_attention_backend("triton" if device.type == "cuda" else "torch")
    runner = ModelRunner(model, arch, backend, plan.num_blocks, config.cache.block_size, dtype,
                         device)
    name = config.model.served_model_name or source.name
    return cls(config, tokenizer, runner, plan.num_blocks, name, arch.vocab_size)


def load_model(source: ModelSource, arch: ModelArch, config: EngineConfig, device: torch.device,
               dtype: torch.dtype) -> nn.Module:
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(arch)(arch)
    finally:
        torch.set_default_dtype(default_dtype)
    if config.model.load_format == "dummy":
        init_dummy_weights(model)
    else:
        model.load_weights(iter_weights(source, dtype))
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module) -> None:
    """Random weights of the right shapes (for benchmarks of configs without checkpoints)."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)


def _kv_cache_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.cache.kv_cache_memory_bytes is not None:
        return config.cache.kv_cache_memory_bytes
    if device.type == "cpu":
        return memory.default_cpu_kv_cache_bytes()
    raise NotImplementedError("GPU memory profiling lands with the GPU backend; "
                              "pass --kv-cache-memory-bytes")
