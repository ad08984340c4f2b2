"""Engine start-up: find the model, load it, size the KV cache, wire the stages together."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from pagedllm.attention.backend import get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.distributed.launch import tensor_parallel_size
from pagedllm.distributed.parallel_state import init_peer_all_reduce, min_over_ranks, tp_group
from pagedllm.engine.core import EngineCore
from pagedllm.engine.executor import UniProcExecutor, start_workers
from pagedllm.engine.generation_config import default_sampling_params
from pagedllm.engine.inputs import InputProcessor
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import create_quantized_weights, quantize_model
from pagedllm.layers.quantization.checkpoint import LoadQuantization, resolve_quantization
from pagedllm.layers.quantization.fp8 import kv_cache_dtype
from pagedllm.models.arch import ModelArch
from pagedllm.models.loader.gguf import gguf_linear_weights_are_q4_1
from pagedllm.models.loader.source import ModelSource, iter_weights, load_hf_config, resolve_model
from pagedllm.models.registry import model_class
from pagedllm.multimodal.image_processor import ImageProcessorConfig, process_image
from pagedllm.tokenizer import Tokenizer, load_tokenizer, placeholder_tokenizer
from pagedllm.worker import cpu_graph, memory
from pagedllm.worker.memory import KVCachePlan
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True)
class FrontendParts:
    """What the front end needs of a model: no weights, nothing on a device."""

    config: EngineConfig
    arch: ModelArch
    tokenizer: Tokenizer
    input_processor: InputProcessor
    model_name: str
    # sampling fields a server request leaves unset take these (generation_config.json)
    default_sampling: dict[str, Any]


def resolve_engine_args(kwargs: dict[str, Any],
                        ) -> tuple[ModelSource, ModelArch, EngineConfig, LoadQuantization]:
    """The model's files, its architecture, the engine config and how its weights load: what
    both halves (front end and core, maybe in two processes) read from the same arguments, the
    model's config read once. A checkpoint format the core cannot load is refused here, so the
    front end refuses it before a core is started."""
    source = resolve_model(kwargs.get("model"))
    hf_config = load_hf_config(source)
    arch = ModelArch.from_hf_config(hf_config)
    config = EngineConfig.create(arch.max_position_embeddings, **kwargs)
    arch.check_tensor_parallel(config.parallel.tensor_parallel_size)
    quant = resolve_quantization(hf_config, config.model.quantization, config.model.load_format,
                                 arch.moe is not None)
    if quant == LoadQuantization("int4", False) and source.kind == "gguf" and \
            arch.moe is None and config.model.load_format != "dummy" and \
            config.parallel.tensor_parallel_size == 1 and \
            gguf_linear_weights_are_q4_1(source.path):
        # the file's Q4_1 blocks are int4's own values: loaded as they are, no float32 copy
        # (every 2-D decoder weight is then a linear layer's)
        quant = LoadQuantization("int4", True)
    return source, arch, config, quant


def build_frontend(kwargs: dict[str, Any]) -> FrontendParts:
    source, arch, config, _ = resolve_engine_args(kwargs)
    try:
        tokenizer = load_tokenizer(source, config.model.chat_template)
    except FileNotFoundError:
        if config.model.load_format != "dummy":
            raise
        logger.warning("No tokenizer in %s: using placeholder tokens (token ids only)",
                       source.path)
        tokenizer = placeholder_tokenizer(arch.vocab_size)
    processor = build_input_processor(source, arch, config, tokenizer)
    name = config.model.served_model_name or source.name
    defaults = default_sampling_params(source, config.model.generation_config)
    return FrontendParts(config, arch, tokenizer, processor, name, defaults)


def build_core(kwargs: dict[str, Any]) -> EngineCore:
    """Loads the model, sizes and allocates the KV cache, captures CUDA graphs (on every
    tensor-parallel rank, each its shard, when there are several)."""
    if tensor_parallel_size(kwargs) > 1:
        executor, (config, plan) = start_workers(kwargs, build_runner)
    else:
        runner, (config, plan) = build_runner(kwargs)
        executor = UniProcExecutor(runner)
    return EngineCore(config, executor, plan.num_blocks, plan.sliding_window)


def build_runner(kwargs: dict[str, Any]) -> tuple[ModelRunner, tuple[EngineConfig, KVCachePlan]]:
    """This rank's runner, with its model shard, KV cache (as many blocks as the smallest rank
    has room for) and CUDA graphs."""
    start = time.perf_counter()
    source, arch, config, quant = resolve_engine_args(kwargs)
    tp = tp_group()
    device = torch.device(config.device.resolved())
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(config.model.dtype, device)
    kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, dtype)
    _note_cpu_fp8(config, device)
    torch.manual_seed(config.model.seed)
    model = load_model(source, arch, config, quant, device, dtype)
    sched = config.scheduler
    init_peer_all_reduce(max(sched.max_num_batched_tokens, sched.max_num_seqs)
                         * arch.hidden_size, dtype)
    weights = memory.loaded_weight_bytes(model)
    per_rank = f" per rank, {tp.size} ranks" if tp.size > 1 else ""
    quantized = f"{quant.method} linear layers, " if quant.method else ""
    logger.info("Loaded %s (%s, %.2f GiB of weights%s, %s%s on %s) in %.1f s", source.name,
                arch.architecture, weights / 2**30, per_rank, quantized, dtype, device,
                time.perf_counter() - start)
    backend = get_attention_backend("triton" if device.type == "cuda" else "torch")
    runner = ModelRunner(model, arch, backend, config.cache.block_size, dtype, device, kv_dtype)
    image_config = None
    if arch.vision is not None:
        image_config = image_processor_config(source, config)
        runner.enable_images(max(config.scheduler.max_num_batched_tokens,
                                 image_config.max_image_tokens()))
    graph_sizes = [] if device.type != "cuda" or config.device.enforce_eager else \
        memory.default_cuda_graph_sizes(config.scheduler.max_num_seqs)
    mixed_sizes = memory.default_mixed_graph_sizes(sched.max_num_batched_tokens, tp.size) \
        if graph_sizes else []
    rank_arch = arch.rank_view(tp.size)
    kv_bytes = config.cache.kv_cache_memory_bytes
    if kv_bytes is None:
        kv_bytes = memory.default_cpu_kv_cache_bytes() if device.type == "cpu" else \
            _profile_gpu_kv_cache_bytes(runner, config, rank_arch, dtype, weights,
                                        graph_sizes + mixed_sizes, image_config)
    plan = KVCachePlan.from_budget(rank_arch, kv_dtype, config.cache.block_size,
                                   config.model.max_model_len, kv_bytes)
    # every rank holds the same blocks: as many as the smallest has room for
    kv_bytes = min_over_ranks(plan.num_blocks) * plan.bytes_per_block
    plan = memory.plan_kv_cache(rank_arch, kv_dtype, config.cache.block_size,
                                config.model.max_model_len, kv_bytes,
                                config.scheduler.max_num_batched_tokens)
    if tp.rank == 0:
        memory.log_kv_cache_plan(plan, logger, device.type, tp.size)
    runner.allocate_kv_cache(plan.num_blocks)
    if graph_sizes:
        runner.capture_cuda_graphs(graph_sizes, config.model.max_model_len, mixed_sizes,
                                   sched.max_num_seqs)
    if cpu_graph.should_compile(device, config.model.quantization, config.device.compile_cpu):
        cpu_graph.compile_cpu_model(runner)
    return runner, (config, plan)


def _note_cpu_fp8(config: EngineConfig, device: torch.device) -> None:
    """FP8 on the CPU is an emulation (the GPU's arithmetic, for tests), not a speed-up."""
    if device.type == "cpu" and (config.model.quantization == "fp8"
                                 or config.cache.kv_cache_dtype != "auto"):
        logger.warning("FP8 on the CPU is emulated with the GPU's arithmetic (for tests): "
                       "slower than the model dtype, and no memory is saved in activations")


def image_processor_config(source: ModelSource, config: EngineConfig) -> ImageProcessorConfig:
    folder = source.path if source.kind == "hf" else None
    return ImageProcessorConfig.from_model_dir(folder, config.multimodal.mm_processor_kwargs)


def build_input_processor(source: ModelSource, arch: ModelArch, config: EngineConfig,
                          tokenizer: Tokenizer) -> InputProcessor:
    image_config = None
    if arch.vision is not None:
        image_config = image_processor_config(source, config)
    elif config.multimodal.mm_processor_kwargs or config.multimodal.limit_mm_per_prompt:
        logger.warning("%s takes no images: the multimodal settings are ignored",
                       arch.architecture)
    return InputProcessor(tokenizer, arch, config.multimodal, image_config)


def _profile_gpu_kv_cache_bytes(runner: ModelRunner, config: EngineConfig, arch: ModelArch,
                                dtype: torch.dtype, weight_bytes: int,
                                graph_sizes: list[int],
                                image_config: ImageProcessorConfig | None) -> int:
    """KV cache budget on a GPU: gpu_memory_utilization x total memory, less the weights, the
    measured activation peak of the largest step (or of the vision encoder's largest call, if
    larger), the CUDA-graph reserve and non-torch memory."""
    start = time.perf_counter()
    activation = runner.profile_run(config.scheduler.max_num_batched_tokens,
                                    config.scheduler.max_num_seqs)
    if image_config is not None:
        largest_image = process_image(Image.new("RGB", image_config.max_image_size()),
                                      image_config)
        encoder = runner.profile_encoder(largest_image)
        logger.info("Vision encoder peak: %.2f GiB (images of %d tokens, the largest allowed); "
                    "language model step peak: %.2f GiB", encoder / 2**30,
                    largest_image.num_tokens, activation / 2**30)
        activation = max(activation, encoder)
    runner.peak_activation_bytes = activation
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    other = max(0, total - free - torch.cuda.memory_reserved())  # CUDA context, NCCL, ...
    graphs = memory.cuda_graph_reserve_estimate(arch, dtype, graph_sizes)
    estimate = memory.activation_bytes_estimate(
        arch, config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs, dtype)
    logger.info("Memory profiling took %.2f s: weights %.2f GiB, peak activations %.2f GiB "
                "(planner's estimate %.2f GiB), CUDA graphs %.2f GiB (reserved), non-torch "
                "%.2f GiB", time.perf_counter() - start, weight_bytes / 2**30,
                activation / 2**30, estimate / 2**30, graphs / 2**30, other / 2**30)
    return memory.gpu_kv_cache_budget(total, config.cache.gpu_memory_utilization, weight_bytes,
                                      activation, graphs, other)


def load_model(source: ModelSource, arch: ModelArch, config: EngineConfig,
               quant: LoadQuantization, device: torch.device, dtype: torch.dtype) -> nn.Module:
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(arch)(arch)
            if quant.prequantized:  # FP8 parameters (and scales) for the checkpoint's tensors
                create_quantized_weights(model, quant.method)
    finally:
        torch.set_default_dtype(default_dtype)
    if config.model.load_format == "dummy":
        init_dummy_weights(model)
    else:
        model.load_weights(iter_weights(source, dtype, keep_q4_1=quant.prequantized))
    quantize_model(model, quant.method)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module) -> None:
    """Random weights of the right shapes (for benchmarks of configs without checkpoints);
    norms start as the identity, as a trained model's roughly are."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                param.normal_(0.0, 0.02)
