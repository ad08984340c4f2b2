"""``pagedllm plan MODEL``: memory and batching before launch, with the engine's own arithmetic.

Weights, the activation peak, the CUDA-graph pool and the KV cache are sized by
``pagedllm.worker.memory`` (what the engine calls at start-up), so the plan shows what
``pagedllm serve`` will log, then what those numbers mean: requests at once per context length,
prefill steps per prompt length, image costs, and settings that contradict each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from pagedllm.config import EngineConfig, add_engine_args, engine_kwargs_from_args
from pagedllm.layers.quantization.checkpoint import checkpoint_quantization, resolve_quantization
from pagedllm.layers.quantization.fp8 import FP8_KV_CACHE_DTYPES
from pagedllm.layers.quantization.int_weight_only import serve_default_quantization
from pagedllm.models.arch import ModelArch
from pagedllm.multimodal.image_processor import ImageProcessorConfig
from pagedllm.multimodal.image_tokens import VISION_WRAPPER_TOKENS, parse_image_size
from pagedllm.worker import memory as mem

GiB = mem.GiB
_LENGTHS = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
_PROMPTS = (512, 2048, 8192, 32768, 131072)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    group = parser.add_argument_group("plan")
    group.add_argument("--gpu-memory-gib", type=float, default=None,
                       help="Plan for a GPU with this much memory (GiB) instead of the one here.")
    group.add_argument("--image-size", action="append", default=[], metavar="WxH",
                       help="Image size to cost in tokens (vision-language models); repeatable.")
    group.add_argument("--format", choices=["table", "json"], default="table")


def main(args: argparse.Namespace) -> int:
    kwargs = engine_kwargs_from_args(args)
    if quantization := serve_default_quantization(kwargs):  # what `serve` would run
        kwargs["quantization"] = quantization
    config, preprocessor, name = _load_model_config(kwargs.get("model"))
    images = [parse_image_size(s) for s in args.image_size]
    report = {"model": name, **build_plan(ModelArch.from_hf_config(config), config, kwargs,
                                          args.gpu_memory_gib, images, preprocessor)}
    print(json.dumps(report, indent=2) if args.format == "json" else render_table(report))
    return 1 if report["errors"] else 0


def _load_model_config(model: str | None) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """The HF config dict, the folder's preprocessor_config.json (if any) and the model's name."""
    from pagedllm.models.loader.source import load_hf_config, resolve_model

    source = resolve_model(model)
    path, preprocessor = os.path.join(source.path, "preprocessor_config.json"), None
    if source.kind == "hf" and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            preprocessor = json.load(f)
    return load_hf_config(source), preprocessor, source.name


def _device_memory(device: str, gpu_gib: float | None,
                   warnings: list[str]) -> tuple[str, int, int | None]:
    """(device, total bytes, free bytes or None) of the machine to plan for."""
    import torch

    if device == "cpu":
        if gpu_gib is not None:
            warnings.append("--gpu-memory-gib is ignored with --device cpu.")
        return "cpu", mem.available_host_memory(), None
    if gpu_gib is not None:
        return "cuda", int(gpu_gib * GiB), None
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return "cuda", total, free
    if device == "cuda":
        raise SystemExit("No CUDA device is visible: pass --gpu-memory-gib N to plan for one.")
    return "cpu", mem.available_host_memory(), None


@dataclass(frozen=True)
class _Settings:
    """The engine settings the plan is for (the user's values even where the engine refuses)."""

    device: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    block_size: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    cuda_graphs: bool
    kv_cache_dtype: str  # the model dtype, or "fp8"


def _settings(arch: ModelArch, kwargs: dict[str, Any], device: str,
              errors: list[str]) -> _Settings:
    """The engine's config; where the engine would refuse it, its error (plus the fix) goes to
    ``errors`` and the plan goes on with the user's values, to show what they would do."""
    derived, refused = arch.max_position_embeddings, None
    try:
        cfg = EngineConfig.create(derived, **kwargs)
    except ValueError as err:
        refused = str(err)
        cfg = EngineConfig.create(derived, **{k: v for k, v in kwargs.items() if k not in (
            "max_model_len", "max_num_batched_tokens")})
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    s = _Settings(
        device, dtype, kwargs.get("max_model_len") or cfg.model.max_model_len,
        cfg.scheduler.max_num_seqs,
        kwargs.get("max_num_batched_tokens") or cfg.scheduler.max_num_batched_tokens,
        cfg.scheduler.enable_chunked_prefill, cfg.cache.block_size,
        cfg.cache.gpu_memory_utilization, cfg.cache.kv_cache_memory_bytes,
        device == "cuda" and not cfg.device.enforce_eager,
        "fp8" if cfg.cache.kv_cache_dtype in FP8_KV_CACHE_DTYPES else dtype)
    if refused is not None:
        errors.append(refused + _config_fix(s, derived))
    return s


def _config_fix(s: _Settings, derived_max_model_len: int) -> str:
    budget, seqs = s.max_num_batched_tokens, s.max_num_seqs
    if s.max_model_len > derived_max_model_len:
        return f" Fix: --max-model-len {derived_max_model_len}."
    if budget < seqs:
        return f" Fix: --max-num-batched-tokens {seqs} or --max-num-seqs {budget}."
    if not s.chunked_prefill and budget < s.max_model_len:
        return (f" Fix: --max-num-batched-tokens {s.max_model_len}, --max-model-len {budget} "
                "or --enable-chunked-prefill.")
    return ""


def _weight_format(arch: ModelArch, config: dict[str, Any], kwargs: dict[str, Any],
                   dtype: str, errors: list[str]) -> str:
    """The key of ``weight_bytes_by_dtype`` the weights take: the checkpoint's stored format
    (even one the engine refuses, whose error goes to ``errors``), else --quantization's, else
    the dtype."""
    requested = kwargs.get("quantization")
    try:
        resolve_quantization(config, requested, kwargs.get("load_format", "auto"),
                             arch.moe is not None)
    except ValueError as err:
        errors.append(str(err))
    stored = checkpoint_quantization(config)
    if stored is None:
        return requested or dtype
    return "fp8" if stored.method == "fp8" else {8: "int8", 4: "int4"}.get(stored.bits, dtype)


def _memory(arch: ModelArch, s: _Settings, weights: int, total: int, free: int | None,
            tp: int, warnings: list[str], errors: list[str]) -> dict[str, Any]:
    """The budget: weights, activation peak and CUDA graphs, and what is left for KV."""
    phases = mem.activation_phases(arch, s.max_num_batched_tokens, s.max_num_seqs, s.dtype)
    sizes = mem.default_cuda_graph_sizes(s.max_num_seqs) if s.cuda_graphs else []
    sizes += mem.default_mixed_graph_sizes(s.max_num_batched_tokens, tp) if sizes else []
    graphs = mem.cuda_graph_reserve_estimate(arch, s.dtype, sizes)
    util = s.gpu_memory_utilization
    m: dict[str, Any] = {
        "total_bytes": total, "free_bytes": free, "gpu_memory_utilization": util,
        "usable_bytes": int(total * util) if s.device == "cuda" else total,
        "weight_bytes": weights, "activation_bytes": max(phases.values()),
        "activation_peak_phase": max(phases, key=phases.__getitem__),
        "cuda_graph_bytes": graphs, "cuda_graph_sizes": len(sizes), "other_bytes": 0}
    m["non_kv_bytes"] = non_kv = weights + m["activation_bytes"] + graphs
    kv = s.kv_cache_memory_bytes
    if kv is not None:
        m["kv_cache_source"], m["kv_budget_bytes"] = "kv_cache_memory_bytes", kv
    elif s.device == "cpu":
        m["kv_cache_source"], m["kv_budget_bytes"] = "cpu_default", mem.default_cpu_kv_cache_bytes()
    else:
        m["kv_cache_source"], m["kv_budget_bytes"] = "gpu_memory_utilization", 0
        try:
            m["kv_budget_bytes"] = mem.gpu_kv_cache_budget(total, util, weights,
                                                           m["activation_bytes"], graphs)
        except ValueError as err:
            errors.append(str(err))
    if non_kv + m["kv_budget_bytes"] > total:
        where = "RAM available" if s.device == "cpu" else "GPU memory"
        warnings.append(f"Weights, activations, CUDA graphs and the KV cache need "
                        f"{_gib(non_kv + m['kv_budget_bytes'])}, more than the {_gib(total)} of "
                        f"{where}: expect out-of-memory errors (lower --kv-cache-memory-bytes, "
                        "--max-num-batched-tokens or --max-num-seqs, or use a smaller --dtype).")
    if free is not None and free < total * util:
        warnings.append(f"Only {_gib(free)} of {_gib(total)} is free on the GPU, less than "
                        f"gpu_memory_utilization x total ({_gib(total * util)}): lower "
                        f"--gpu-memory-utilization to {math.floor(free / total * 100) / 100}.")
    return m


def build_plan(arch: ModelArch, config: dict[str, Any], kwargs: dict[str, Any],
               gpu_gib: float | None, images: list[tuple[int, int]],
               preprocessor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every number of the plan, as one JSON-ready dict (snake_case keys)."""
    warnings: list[str] = []
    errors: list[str] = []
    device, total, free = _device_memory(kwargs.get("device", "auto"), gpu_gib, warnings)
    s = _settings(arch, kwargs, device, errors)
    vision = config.get("vision_config")
    vision_params = mem.count_vision_parameters(vision) if vision else 0
    params = mem.count_parameters(arch)
    # With tensor parallelism, memory is planned for one rank: its share of the weights and
    # KV heads, its activations (the vision tower is replicated on every rank).
    tp = kwargs.get("tensor_parallel_size") or 1
    try:
        arch.check_tensor_parallel(tp)
    except ValueError as err:
        errors.append(str(err))
        tp = 1
    weight_bytes = mem.weight_bytes_by_dtype(arch, vision_params, tp)
    if device == "cpu":  # the CPU's integer methods keep a bfloat16 copy beside the integers
        weight_bytes.update({m: mem.cpu_int_weight_bytes(arch, m, s.dtype, vision_params, tp)
                             for m in ("int8", "int4")})
    weight_format = _weight_format(arch, config, kwargs, s.dtype, errors)
    arch = arch.rank_view(tp)
    memory = _memory(arch, s, weight_bytes[weight_format], total, free, tp, warnings, errors)
    plan = mem.KVCachePlan.from_budget(arch, s.kv_cache_dtype, s.block_size, s.max_model_len,
                                       memory["kv_budget_bytes"], s.max_num_batched_tokens)
    try:
        if memory["kv_budget_bytes"] > 0:
            mem.plan_kv_cache(arch, s.kv_cache_dtype, s.block_size, s.max_model_len,
                              plan.kv_cache_bytes, s.max_num_batched_tokens)
    except ValueError as err:
        errors.append(str(err) + _memory_fix(plan, memory))
    budget = s.max_num_batched_tokens
    report: dict[str, Any] = {
        "architecture": arch.architecture, "device": device, "dtype": s.dtype,
        "tensor_parallel_size": tp,
        "parameters": {"decoder": params, "vision": vision_params, "total": params + vision_params},
        "weight_bytes": weight_bytes, "weight_format": weight_format,
        "kv_cache_dtype": s.kv_cache_dtype,
        "kv_bytes_per_token": mem.kv_bytes_per_token(arch, s.kv_cache_dtype),
        "kv_bytes_per_block": plan.bytes_per_block, "block_size": plan.block_size,
        "memory": memory,
        "kv_cache": {"bytes": plan.kv_cache_bytes, "gib": round(plan.kv_cache_bytes / GiB, 2),
                     "tokens": plan.num_tokens, "blocks": plan.num_blocks,
                     "max_model_len": s.max_model_len,
                     # Concurrency counts what a request holds: with a window on every layer,
                     # the blocks of window - 1 + max_num_batched_tokens positions at most.
                     "sliding_window": plan.sliding_window,
                     "tokens_held_per_request": plan.tokens_held(s.max_model_len),
                     "max_concurrency": round(plan.max_concurrency, 2),
                     "largest_fitting_len": plan.largest_fitting_len},
        "concurrency": [_concurrency(plan, n, s.max_num_seqs)
                        for n in _upto(_LENGTHS, s.max_model_len)],
        "batching": {"max_num_seqs": s.max_num_seqs, "max_num_batched_tokens": budget,
                     "enable_chunked_prefill": s.chunked_prefill,
                     "prefill_steps": [_steps(p, budget, s.chunked_prefill)
                                       for p in _upto(_PROMPTS, s.max_model_len)]},
    }
    if vision:
        spec = ImageProcessorConfig.from_dict(preprocessor or {},
                                              kwargs.get("mm_processor_kwargs"))
        report["images"] = _image_rows(spec, images, s.max_model_len, budget, warnings)
    _check_batching(plan, s.max_num_seqs, budget, warnings)
    report["warnings"], report["errors"] = warnings, errors
    return report


def _memory_fix(plan: mem.KVCachePlan, memory: dict[str, Any]) -> str:
    """How much GPU memory one max_model_len request needs, when sized by utilization."""
    if memory["kv_cache_source"] != "gpu_memory_utilization":
        return ""
    blocks = math.ceil(plan.tokens_held(plan.max_model_len) / plan.block_size)
    needed = memory["non_kv_bytes"] + blocks * plan.bytes_per_block
    util = math.ceil(needed / memory["total_bytes"] * 100) / 100
    return (f" --gpu-memory-utilization {util} would fit it." if util <= 1 else
            f" It needs a GPU with {_gib(needed / memory['gpu_memory_utilization'])}.")


def _upto(lengths: tuple[int, ...], max_len: int) -> list[int]:
    return [n for n in lengths if n < max_len] + [max_len]


def _concurrency(plan: mem.KVCachePlan, length: int, max_num_seqs: int) -> dict[str, Any]:
    per_request = math.ceil(plan.tokens_held(length) / plan.block_size)
    return {"tokens_per_request": length, "max_concurrency": round(plan.concurrency_at(length), 2),
            "running_at_once": min(max_num_seqs, plan.num_blocks // per_request)}


def _steps(prompt: int, budget: int, chunked: bool) -> dict[str, Any]:
    """Steps to prefill one prompt alone (running decodes take one token each of the budget)."""
    steps = math.ceil(prompt / budget) if chunked or prompt <= budget else None
    return {"prompt_tokens": prompt, "steps": steps}


def _image_rows(spec: ImageProcessorConfig, images: list[tuple[int, int]], max_len: int,
                budget: int, warnings: list[str]) -> list[dict[str, Any]]:
    """One row per image size, then the bound for any image (about max_pixels / 28^2)."""
    rows = []
    for w, h in images:
        grid = spec.grid(w, h)
        rows.append({"image": f"{w}x{h}", "resized": f"{grid.resized_width}x{grid.resized_height}",
                     "image_tokens": grid.num_tokens})
    rows.append({"image": "any (max_pixels)", "resized": f"<= {spec.max_pixels:,} px",
                 "image_tokens": spec.max_image_tokens()})
    for row in rows:
        cost = row["image_tokens"] + VISION_WRAPPER_TOKENS
        label = row["image"]
        row.update(prompt_tokens=cost, context_left=max_len - cost,
                   max_images_per_request=max_len // cost, prefill_steps=math.ceil(cost / budget))
        if cost > max_len:
            warnings.append(f"A {label} image costs {cost} tokens, more than max_model_len "
                            f"({max_len}): raise --max-model-len or send smaller images.")
    return rows


def _check_batching(plan: mem.KVCachePlan, seqs: int, budget: int, warnings: list[str]) -> None:
    if 0 < plan.num_blocks < seqs:
        warnings.append(f"max_num_seqs ({seqs}) exceeds the KV cache's {plan.num_blocks} blocks: "
                        f"at most {plan.num_blocks} requests can run at once; lower "
                        f"--max-num-seqs to {plan.num_blocks} or give the cache more memory.")
    if 0 < plan.num_tokens < budget:
        warnings.append(f"max_num_batched_tokens ({budget}) exceeds the KV cache's "
                        f"{plan.num_tokens} tokens: steps can never be full; lower "
                        f"--max-num-batched-tokens to {plan.num_tokens}.")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


_WEIGHT_NOTES = {  # the lines under the weights', by "on the CPU"
    False: ["(fp8/int8/int4: the linear layers quantized, the rest in 16 bits)"],
    True: ["(fp8: the linear layers quantized, the rest in 16 bits; int8/int4: the linear layers",
           " in integers and in bfloat16, the LM head in int8 and in bfloat16, the rest in the "
           "model dtype)"],
}


def render_table(r: dict[str, Any]) -> str:
    """The plan as aligned text sections."""
    m, kv, b = r["memory"], r["kv_cache"], r["batching"]
    p = r["parameters"]
    params = f"{p['total']:,}" + (f" ({p['vision']:,} in the vision tower)" if p["vision"] else "")
    ranks = r["tensor_parallel_size"]
    per_rank = f", {ranks} tensor-parallel ranks (memory per rank)" if ranks > 1 else ""
    lines = [f"{r['model']}  {r['architecture']}  on {r['device']}, {r['dtype']}{per_rank}", "",
             f"Parameters: {params}", "Weights:   " + "  ".join(
                 f"{k} {_gib(v)}" for k, v in r["weight_bytes"].items()),
             *("           " + line for line in _WEIGHT_NOTES[r["device"] == "cpu"]),
             f"KV cache per token: {r['kv_bytes_per_token']:,} B   per block of "
             f"{r['block_size']}: {r['kv_bytes_per_block']:,} B   ({r['kv_cache_dtype']})", "",
             "Memory budget:"]
    if r["device"] == "cuda":
        lines.append(f"  {m['gpu_memory_utilization']} x {_gib(m['total_bytes'])} = "
                     f"{_gib(m['usable_bytes'])}")
    else:
        lines.append(f"  RAM available: {_gib(m['total_bytes'])}")
    rows = [(f"weights ({r['weight_format']})", m["weight_bytes"], ""),
            (f"activations ({b['max_num_batched_tokens']:,} tokens)", m["activation_bytes"],
             f"  peak in {m['activation_peak_phase']}"),
            (f"CUDA graphs ({m['cuda_graph_sizes']} sizes)", m["cuda_graph_bytes"], "")]
    rows = rows if r["device"] == "cuda" else rows[:2]
    lines += [f"  - {name:<30} {_gib(n):>11}{note}" for name, n, note in rows]
    lines += [f"  = KV cache ({m['kv_cache_source']}): {kv['gib']:.2f} GiB, {kv['tokens']:,} "
              f"tokens, {kv['blocks']:,} blocks", "",
              f"Maximum concurrency for {kv['max_model_len']:,} tokens per request: "
              f"{kv['max_concurrency']:.2f}x"]
    if kv["sliding_window"] and kv["tokens_held_per_request"] < kv["max_model_len"]:
        lines.append(f"  (sliding window of {kv['sliding_window']:,} on every layer: a request "
                     f"holds at most {kv['tokens_held_per_request']:,} tokens of KV cache)")
    lines.append("  tokens/request  concurrency  running at once")
    lines += [f"  {c['tokens_per_request']:>14,}  {c['max_concurrency']:>10.2f}x  "
              f"{c['running_at_once']:>15}" for c in r["concurrency"]]
    chunked = "on" if b["enable_chunked_prefill"] else "off"
    lines += ["", f"Per step: up to {b['max_num_batched_tokens']:,} tokens, {b['max_num_seqs']} "
              f"requests (chunked prefill {chunked})", "  prompt tokens  prefill steps"]
    lines += [f"  {s['prompt_tokens']:>13,}  {s['steps'] if s['steps'] else 'rejected':>13}"
              for s in b["prefill_steps"]]
    if r.get("images"):
        lines += ["", "Images (tokens include <|vision_start|>/<|vision_end|>):",
                  "  image              resized             tokens  context left  per request"]
        lines += [f"  {i['image']:<18} {i['resized']:<18} {i['prompt_tokens']:>6}  "
                  f"{i['context_left']:>12,}  {i['max_images_per_request']:>11}"
                  for i in r["images"]]
    lines += [""] + [f"WARNING: {w}" for w in r["warnings"]]
    lines += [f"ERROR (the engine would refuse to start): {e}" for e in r["errors"]]
    return "\n".join(lines).rstrip() + "\n"
