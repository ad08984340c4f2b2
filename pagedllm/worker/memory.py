"""Memory sizing: weights, activations, CUDA graphs and the KV cache, in one place.

The engine's start-up and ``pagedllm plan`` both call these functions, so the planner's numbers
are the engine's numbers. Everything here is arithmetic on ``ModelArch``; nothing allocates.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from pagedllm.models.arch import ModelArch, VisionArch

GiB = 1 << 30

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2, "int8": 1, "uint8": 1, "fp8": 1, "float8_e4m3fn": 1,
}

# Sampler bytes per [rows, vocab] logit at its peak (the top-k/top-p path of worker/sampler.py):
# raw fp32 logits 4, temperature-scaled copy 4, sorted values 4, sort indices (int64) 8, mask 1,
# sorted probabilities 4 and their cumulative sum 4, masked sorted logits 4, the scattered
# result 4 (= 37), plus sort/scatter workspace: 40.1 measured on an H100 (torch 2.11). A batch
# that also uses min_p keeps its masked logits alive too: about 45 (counted, not measured).
SAMPLER_BYTES_PER_LOGIT = 40
# Fixed cost of one captured CUDA graph beyond the shared memory pool (graph nodes, static
# inputs/outputs, allocator rounding); a rough figure until cuda_graphs.py measures it.
CUDA_GRAPH_BYTES_PER_SIZE = 2 << 20
INT4_GROUP_SIZE = 128


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element: ``"bfloat16"``, ``"bf16"``, ``"torch.float16"``, ``torch.float32``..."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    name = dtype.removeprefix("torch.").lower()
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; resolve 'auto' before sizing memory")
    return _DTYPE_BYTES[name]


def kv_bytes_per_token(arch: ModelArch, dtype: str | torch.dtype) -> int:
    """One token's keys and values in every layer: layers x 2 x kv_heads x head_dim x bytes."""
    return arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * dtype_bytes(dtype)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by kind. ``linear`` (attention and MLP matrices) is what weight-only
    quantization shrinks; embeddings, lm_head, norms and biases usually stay in 16 bits."""

    embedding: int
    linear: int  # every expert's matrices included, not only the top-k a token runs
    other: int  # norms, biases and MoE routers (which quantizers keep in 16 bits too)
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.linear + self.other + self.lm_head


def parameter_breakdown(arch: ModelArch) -> ParameterCount:
    """The decoder's parameters, counted as the HF ``*ForCausalLM`` modules hold them."""
    h, q, kv = arch.hidden_size, arch.q_size, arch.kv_size
    linear = arch.num_layers * (h * q + 2 * h * kv + q * h)  # q, k, v, o
    other = 2 * h  # input and post-attention RMSNorm
    if arch.model_type.startswith("gemma"):
        other += 2 * h  # Gemma's pre- and post-feedforward RMSNorm
    if arch.qkv_bias:
        other += q + 2 * kv
        # Llama/Qwen3's attention_bias covers o_proj too; Qwen2(-VL) biases only q, k and v.
        if not arch.model_type.startswith("qwen2"):
            other += h
    if arch.qk_norm:
        other += 2 * arch.head_dim
    embedding = arch.vocab_size * h
    mlp_linear, mlp_other = _mlp_parameters(arch)
    return ParameterCount(
        embedding=embedding, linear=linear + mlp_linear,
        other=arch.num_layers * other + mlp_other + h,  # + final norm
        lm_head=0 if arch.tie_word_embeddings else embedding)


def _mlp_parameters(arch: ModelArch) -> tuple[int, int]:
    """(matrices, routers) of all layers' MLPs: gate, up and down of the dense MLP, or of each
    of a sparse layer's experts plus its router [num_experts, hidden]."""
    h, dense = arch.hidden_size, 3 * arch.hidden_size * arch.intermediate_size
    num_sparse = sum(arch.is_sparse(i) for i in range(arch.num_layers))
    if arch.moe is None or not num_sparse:
        return arch.num_layers * dense, 0
    experts = arch.moe.num_experts * 3 * h * arch.moe.intermediate_size
    return ((arch.num_layers - num_sparse) * dense + num_sparse * experts,
            num_sparse * arch.moe.num_experts * h)


def count_parameters(arch: ModelArch) -> int:
    """Total decoder parameters (tied embeddings counted once), equal to HF's ``numel`` sum."""
    return parameter_breakdown(arch).total


def loaded_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters of a loaded model occupy (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rank_parameters(arch: ModelArch, tp_size: int) -> ParameterCount:
    """One of ``tp_size`` tensor-parallel ranks' parameters: its heads and MLP slice, its rows of
    the (padded) vocabulary; norms are replicated."""
    p = parameter_breakdown(arch.rank_view(tp_size))
    rows = -(-arch.vocab_size // tp_size) * arch.hidden_size
    return replace(p, embedding=rows, lm_head=rows if p.lm_head else 0)


def weight_bytes_by_dtype(arch: ModelArch, vision_params: int = 0,
                          tp_size: int = 1) -> dict[str, int]:
    """Weight bytes in float32/bfloat16/float16, and what quantization makes them: fp8
    (``--quantization fp8`` or an FP8 checkpoint: a byte per weight and an fp32 scale per output
    channel; a mixture of experts' fused experts stay in 16 bits), int8 and int4 (weight-only, one
    fp16 scale per group of ``INT4_GROUP_SIZE``) on the decoder's linear layers, everything else
    (and the vision tower) kept in 16 bits, as GPTQ/AWQ/FP8 checkpoints do."""
    p = rank_parameters(arch, tp_size)  # with tp_size > 1: one rank's (the vision tower whole)
    arch = arch.rank_view(tp_size)
    kept16 = 2 * (p.total - p.linear + vision_params)
    out = {name: (p.total + vision_params) * _DTYPE_BYTES[name]
           for name in ("float32", "bfloat16", "float16")}
    experts = _expert_parameters(arch)
    out["fp8"] = p.linear + experts + 4 * linear_output_rows(arch) + kept16
    out["int8"] = p.linear + kept16
    out["int4"] = p.linear // 2 + p.linear * 2 // INT4_GROUP_SIZE + kept16
    return out


def cpu_int_weight_bytes(arch: ModelArch, method: str, dtype: str | torch.dtype,
                         vision_params: int = 0, tp_size: int = 1) -> int:
    """What ``--quantization int4``/``int8`` hold on the CPU (layers/quantization/
    int_weight_only.py): each decoder linear weight in integers (int4: half a byte plus a bf16
    scale and zero per 32; int8: a byte plus a bf16 scale per row) and again in bfloat16 for
    many-row products; the LM head's int8 values as an int4 pair (a byte a weight, scale and
    zero per group) plus a bfloat16 copy; everything else (the embedding, tied or not, norms,
    fused experts, the vision tower) in the model dtype."""
    from pagedllm.layers.quantization.int_weight_only import INT4_GROUP, pair_group

    p = rank_parameters(arch, tp_size)
    arch = arch.rank_view(tp_size)
    experts = _expert_parameters(arch)
    linear = p.linear - experts
    if method == "int4":
        quantized = linear // 2 + linear * 4 // INT4_GROUP
    elif method == "int8":
        quantized = linear + 2 * linear_output_rows(arch)
    else:
        raise ValueError(f"{method!r} is not a CPU integer method (int4, int8)")
    k = arch.hidden_size
    rows = p.embedding // k
    group = pair_group(k)
    head = rows * k + (8 * rows * k // group if group else 2 * rows)  # pair, or the int8 kernel
    kept = (p.total - linear - p.lm_head + vision_params) * dtype_bytes(dtype)
    return quantized + 2 * linear + head + 2 * rows * k + kept


def linear_output_rows(arch: ModelArch) -> int:
    """Output channels of the decoder's linear layers that ``--quantization fp8`` quantizes
    (each has one per-channel scale): attention and dense MLPs, not the fused experts."""
    h = arch.hidden_size
    attention = arch.q_size + 2 * arch.kv_size + h
    num_sparse = sum(arch.is_sparse(i) for i in range(arch.num_layers))
    return arch.num_layers * attention + (arch.num_layers - num_sparse) * (
        2 * arch.intermediate_size + h)


def _expert_parameters(arch: ModelArch) -> int:
    """The routed experts' matrices (gate, up, down of each), all sparse layers."""
    if arch.moe is None:
        return 0
    num_sparse = sum(arch.is_sparse(i) for i in range(arch.num_layers))
    return num_sparse * arch.moe.num_experts * 3 * arch.hidden_size * arch.moe.intermediate_size


def count_vision_parameters(vision_config: dict[str, Any]) -> int:
    """The vision tower: Conv3d patch embedding (no bias), ``depth`` pre-norm blocks (qkv and
    proj with biases, then the MLP) and the 2x2 patch merger (norm + 2 linears). Qwen2-VL's
    norms are LayerNorms (weight and bias) and its MLP fc1, fc2; Qwen2.5-VL's norms are
    RMSNorms (weight only) and its MLP gate, up and down, all with biases."""
    # transformers' default for both towers' output width, should the config omit it
    v = VisionArch.from_hf_config(vision_config, lm_hidden_size=3584)
    e, mlp, out = v.embed_dim, v.mlp_width, v.out_hidden_size
    merged = e * v.spatial_merge_size ** 2
    norm = e if v.family == "qwen2_5_vl" else 2 * e
    mlp_params = (2 if v.family == "qwen2_5_vl" else 1) * (e * mlp + mlp) + (mlp * e + e)
    block = 2 * norm + (e * 3 * e + 3 * e) + (e * e + e) + mlp_params
    merger = norm + (merged * merged + merged) + (merged * out + out)
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * e
    return patch + v.depth * block + merger


def activation_phases(arch: ModelArch, num_tokens: int, max_num_seqs: int,
                      dtype: str | torch.dtype) -> dict[str, int]:
    """Live activation bytes at the peak of each phase of one forward of ``num_tokens`` tokens,
    for the decoder in models/llama.py (one layer's temporaries are freed before the next).

    With T tokens, d bytes per element, x the residual [T, H] and n its normed copy [T, H]:

    - ``qk_norm`` (Qwen3 only): x, n, the fused qkv output [T, q + 2kv] and the two fp32
      temporaries of RMSNorm over q (upcast, scaled): 8Tq bytes
    - ``rotary``: x, n, qkv, (the q/k norm outputs), cos and sin [T, head_dim], then q*cos,
      rotate_half(q) * sin and their sum (3Tq elements; then k's three with the rotated q
      kept: T(q + 3kv))
    - ``attention``: x, n, qkv, rotated q and k, attention output [T, q], o_proj output [T, H]
      (the attention kernel is assumed to keep nothing of size T x T: flash-style)
    - ``mlp``: the layer's input x (still held by the caller's loop), x + attention, n,
      gate_up [T, 2I], silu(gate) [T, I] and silu(gate) * up [T, I]
    - ``logits``: final hidden [T, H] + the sampler over S = min(T, max_num_seqs) rows of V
      logits, ``SAMPLER_BYTES_PER_LOGIT`` bytes each (fp32 logits, sort values and indices,
      probabilities); the lm_head output in d and its fp32 copy (d + 4 per logit) come before

    The layer norms (x, the fp32 upcast and scaled copies: T(dH + 8H)) stay below the mlp phase
    whenever I >= H, and embeddings, positions and attention metadata are O(T), so they are left
    out. Phases run one after another, so the peak is their maximum, not their sum. Checked on
    an H100 against ``torch.cuda.max_memory_allocated`` (bf16, flash-style attention) for
    Llama-3.2-1B/3.1-8B, Qwen3-0.6B and Qwen2-VL-7B at 256 to 16,384 tokens and 1 or 256
    sampled rows: the peak within 0.2% (the forward alone exact from 512 tokens; below, the
    O(T x head_dim) terms left out make it up to 10% low).
    """
    t, d = num_tokens, dtype_bytes(dtype)
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    base = d * t * (2 * h + q + 2 * kv)  # x, n, qkv
    normed_qk = d * t * (q + kv) if arch.qk_norm else 0
    rows = min(num_tokens, max_num_seqs)
    phases = {
        "rotary": base + normed_qk + d * t * (2 * arch.head_dim + max(3 * q, q + 3 * kv)),
        "attention": base + normed_qk + d * t * (q + kv + q + h),
        "mlp": d * t * (3 * h + 4 * inter),
        "logits": d * t * h + rows * arch.vocab_size * SAMPLER_BYTES_PER_LOGIT,
    }
    if arch.qk_norm:
        phases["qk_norm"] = base + 8 * t * q
    return phases


def activation_bytes_estimate(arch: ModelArch, num_tokens: int, max_num_seqs: int,
                              dtype: str | torch.dtype) -> int:
    """Peak activation memory of one forward of ``num_tokens`` tokens plus the sampler: the
    largest of ``activation_phases``."""
    return max(activation_phases(arch, num_tokens, max_num_seqs, dtype).values())


def default_cuda_graph_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, then every multiple of 8 up to max_num_seqs."""
    top = min(max_num_seqs, limit)
    return sorted({s for s in (1, 2, 4) if s <= top} | set(range(8, top + 1, 8)) | {top})


def default_mixed_graph_sizes(max_num_batched_tokens: int, tensor_parallel_size: int,
                              limit: int = 2048) -> list[int]:
    """Token counts to capture for steps with prompt tokens (``worker/cuda_graphs.py``): every
    64 up to 1,024, then every 128, up to ``limit`` or the step budget, which is one too (a
    step is padded to the next: at most 12 % more rows from 512 tokens on). Larger steps are
    bound by their kernels, not by launching them, and run eagerly. None with tensor
    parallelism (its all-reduces in these graphs are not tested yet)."""
    if tensor_parallel_size > 1:
        return []
    top = min(limit, max_num_batched_tokens)
    grid = [s for s in [*range(64, 1025, 64), *range(1152, limit + 1, 128)] if s < top]
    return [*grid, top]


def cuda_graph_reserve_estimate(arch: ModelArch, dtype: str | torch.dtype,
                                capture_sizes: Sequence[int]) -> int:
    """Memory kept by captured graphs (``capture_sizes``: their token counts, decode and
    mixed). Graphs captured largest first share one pool, so it holds the activations of the
    largest size (no sampler: it runs outside the graph), plus ``CUDA_GRAPH_BYTES_PER_SIZE``
    for each captured size."""
    if not capture_sizes:
        return 0
    phases = activation_phases(arch, max(capture_sizes), 1, dtype)
    phases.pop("logits")
    return max(phases.values()) + len(capture_sizes) * CUDA_GRAPH_BYTES_PER_SIZE


def kv_sliding_window(arch: ModelArch) -> int:
    """The window the KV cache manager may free blocks behind: the largest window when every
    layer slides (a block out of it is out of every layer's), 0 when any layer attends to the
    whole context (Gemma 2/3 alternate: their blocks are all kept, see KVCacheManager)."""
    windows = {arch.sliding_window(i) for i in range(arch.num_layers)}
    return 0 if 0 in windows else max(windows)


@dataclass(frozen=True)
class KVCachePlan:
    block_size: int
    bytes_per_block: int
    num_blocks: int
    kv_cache_bytes: int  # num_blocks x bytes_per_block (the budget rounded down to blocks)
    num_tokens: int  # num_blocks x block_size
    max_model_len: int
    sliding_window: int = 0  # every layer's window (kv_sliding_window); 0: full attention
    # Positions a request holds at most with a sliding window: its window (less the query)
    # and one step's tokens, window - 1 + max_num_batched_tokens, as vLLM counts them.
    window_tokens: int = 0

    @classmethod
    def from_budget(cls, arch: ModelArch, dtype: str | torch.dtype, block_size: int,
                    max_model_len: int, kv_cache_bytes: int,
                    max_num_batched_tokens: int = 0) -> KVCachePlan:
        """As many whole blocks as ``kv_cache_bytes`` holds, without checking they suffice.
        ``max_num_batched_tokens`` bounds what a sliding-window request holds (0: unbounded)."""
        per_block = kv_bytes_per_token(arch, dtype) * block_size
        blocks = max(kv_cache_bytes, 0) // per_block
        window = kv_sliding_window(arch)
        window_tokens = window - 1 + max_num_batched_tokens if window and \
            max_num_batched_tokens else 0
        return cls(block_size, per_block, blocks, blocks * per_block, blocks * block_size,
                   max_model_len, window, window_tokens)

    @property
    def max_concurrency(self) -> float:
        """How many max_model_len-token requests the cache holds at once."""
        return self.concurrency_at(self.max_model_len)

    def concurrency_at(self, tokens_per_request: int) -> float:
        return self.num_tokens / self.tokens_held(tokens_per_request)

    def tokens_held(self, tokens_per_request: int) -> int:
        """KV slots a request holds at most: one per token, or with a sliding window on every
        layer, the blocks of ``window_tokens`` positions, plus one where they straddle a block
        boundary (the manager frees the blocks left of the window)."""
        if not self.window_tokens:
            return tokens_per_request
        blocks = -(-self.window_tokens // self.block_size) + 1
        return min(tokens_per_request, blocks * self.block_size)

    @property
    def largest_fitting_len(self) -> int:
        """The longest request (prompt + output) the whole cache can hold (with a sliding
        window: the cache's tokens, or max_model_len if a longer request fits anyway)."""
        if self.tokens_held(self.max_model_len) <= self.num_tokens:
            return max(self.num_tokens, self.max_model_len)
        return self.num_tokens


def plan_kv_cache(arch: ModelArch, dtype: str | torch.dtype, block_size: int,
                  max_model_len: int, kv_cache_bytes: int,
                  max_num_batched_tokens: int = 0) -> KVCachePlan:
    """Blocks for ``kv_cache_bytes``; raises ValueError when one max_model_len-token request
    does not fit."""
    plan = KVCachePlan.from_budget(arch, dtype, block_size, max_model_len, kv_cache_bytes,
                                   max_num_batched_tokens)
    if plan.num_tokens < plan.tokens_held(max_model_len):
        needed = math.ceil(plan.tokens_held(max_model_len) / block_size) * plan.bytes_per_block
        raise ValueError(
            f"The model's max seq len ({max_model_len}) is larger than the maximum number of "
            f"tokens that can be stored in KV cache ({plan.num_tokens}): one request needs "
            f"{needed / GiB:.2f} GiB of KV cache ({needed} bytes) and {kv_cache_bytes / GiB:.2f} "
            f"GiB is available. The largest max_model_len that fits is {plan.num_tokens}. Try "
            "increasing `gpu_memory_utilization` / `kv_cache_memory_bytes` or decreasing "
            f"`max_model_len` (--max-model-len {plan.num_tokens}).")
    return plan


def available_host_memory() -> int:
    """Bytes of RAM available to a new allocation: MemAvailable from /proc/meminfo (Linux),
    else free pages from sysconf, else all physical pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    page = os.sysconf("SC_PAGE_SIZE")
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(name) * page
        except (ValueError, OSError):
            continue
    return 16 * GiB


def default_cpu_kv_cache_bytes() -> int:
    """KV cache size on CPU when ``kv_cache_memory_bytes`` is not given: 4 GiB (vLLM's CPU
    default, ``VLLM_CPU_KVCACHE_SPACE``), but at most a quarter of the RAM available now, so
    that the weights (loaded after sizing) and the activations still fit beside it."""
    return min(4 * GiB, available_host_memory() // 4)


def gpu_kv_cache_budget(total_bytes: int, gpu_memory_utilization: float, weight_bytes: int,
                        activation_bytes: int, cuda_graph_bytes: int, other_bytes: int = 0) -> int:
    """What is left for the KV cache of ``gpu_memory_utilization x total_bytes`` after the
    weights, the activation peak, the CUDA-graph pool and other (non-torch) memory."""
    usable = int(total_bytes * gpu_memory_utilization)
    used = weight_bytes + activation_bytes + cuda_graph_bytes + other_bytes
    left = usable - used
    if left <= 0:
        raise ValueError(
            f"No memory left for the KV cache: gpu_memory_utilization {gpu_memory_utilization} "
            f"x {total_bytes / GiB:.2f} GiB = {usable / GiB:.2f} GiB, but weights take "
            f"{weight_bytes / GiB:.2f} GiB, activations {activation_bytes / GiB:.2f} GiB, CUDA "
            f"graphs {cuda_graph_bytes / GiB:.2f} GiB and other memory {other_bytes / GiB:.2f} "
            f"GiB ({used / GiB:.2f} GiB). Increase `gpu_memory_utilization`, or decrease "
            "`max_num_batched_tokens` / `max_num_seqs`, or use a GPU with more memory.")
    return left


def log_kv_cache_plan(plan: KVCachePlan, logger: logging.Logger, device: str = "cuda",
                      tp_size: int = 1) -> None:
    """The start-up lines vLLM users look for (same wording, same numbers; with tensor
    parallelism the memory is each rank's, the tokens are the engine's)."""
    prefix = "GPU " if device.startswith("cuda") else ""
    per_rank = f" per rank ({tp_size} ranks)" if tp_size > 1 else ""
    logger.info("Available KV cache memory: %.2f GiB%s", plan.kv_cache_bytes / GiB, per_rank)
    logger.info("%sKV cache size: %s tokens", prefix, f"{plan.num_tokens:,}")
    if plan.window_tokens:  # vLLM's figure too: what a sliding-window request holds at most
        logger.info("Sliding window of %d on every layer: a request holds at most %s KV cache "
                    "tokens (blocks of window - 1 + max_num_batched_tokens)", plan.sliding_window,
                    f"{plan.tokens_held(plan.max_model_len):,}")
    logger.info("Maximum concurrency for %s tokens per request: %.2fx",
                f"{plan.max_model_len:,}", plan.max_concurrency)
    if not prefix:  # the host's pages are mapped on first write (allocate_kv_cache)
        logger.info("The KV cache's memory becomes resident as its blocks are first used: "
                    "the engine process grows by up to %.2f GiB under load and keeps it (the "
                    "blocks hold the prefix cache)", plan.kv_cache_bytes / GiB)
