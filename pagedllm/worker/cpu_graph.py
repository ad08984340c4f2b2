"""The CPU step with less Python: the model compiled by inductor, attention an opaque op.

With int4 weights a batch-1 step of SmolLM2-135M spends less time in its matmuls than in the
~1,200 small PyTorch calls around them (norms, rotary, casts, views), each a few microseconds of
dispatch. ``torch.compile`` fuses those into a few C++ kernels per layer. Each ``Attention``
forward becomes one custom op (``pagedllm::cpu_attention``) that runs the layer's eager
attention, so the whole model is one graph and a step one compiled call (cutting the graph at
attention instead gave ~120 compiled regions a step, whose own call overhead ate the gain:
measured). Attention keeps the paged backend's per-step planning (chunks, decode groups, block
tables), so chunked prefill and mixed batches run compiled too: a one-token step gets a graph of
its own (dynamo specializes size 1), every other size shares a dynamic one, split in two where
the quantized products change kernel (``gemm_rows``: the integer kernel below, a bfloat16 GEMM
from there on). The warm-up compiles all three, so no step recompiles while serving.

Compiling the 30-layer graph takes ~2 minutes on two busy cores the first time (inductor's
on-disk cache shortens later starts), so it is opt-in (``--compile-cpu``) and done at start-up,
on dummy steps with their own one-block KV cache. (On a background thread while the engine
served eagerly, dynamo's tracing held the GIL and the steps crawled: 0.2 tok/s through the
server, measured.) Only quantized models are compiled: float32 stays the eager, exact reference.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

from pagedllm.attention.backend import AttentionMetadata, ForwardContext, forward_context
from pagedllm.distributed.parallel_state import tp_size
from pagedllm.layers.attention import Attention

logger = logging.getLogger(__name__)

COMPILED_QUANTIZATIONS = ("int4", "int8")


def should_compile(device: torch.device, quantization: str | None, compile_cpu: bool) -> bool:
    """The policy: quantized CPU models, when ``--compile-cpu`` asks."""
    return device.type == "cpu" and quantization in COMPILED_QUANTIZATIONS and compile_cpu


# Attention modules by id, for the custom op (an op's arguments are tensors and scalars).
_ATTENTION: weakref.WeakValueDictionary[int, Attention] = weakref.WeakValueDictionary()
_EAGER_FORWARD = Attention.forward


@torch.library.custom_op("pagedllm::cpu_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  module_id: int) -> torch.Tensor:
    """The layer's eager attention, opaque to the compiler (it writes the KV cache, which is
    not an argument: reached through the step's forward context)."""
    return _EAGER_FORWARD(_ATTENTION[module_id], q, k, v)


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module_id: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _opaque_forward(self: Attention, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    return torch.ops.pagedllm.cpu_attention(q, k, v, id(self))


def compile_model(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``model``'s forward compiled whole, each attention one opaque op in the graph (dynamo
    compiles on the first call)."""
    for module in model.modules():
        if isinstance(module, Attention):
            _ATTENTION[id(module)] = module
            module.forward = _opaque_forward.__get__(module)
    return torch.compile(model.forward, dynamic=True)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``compile_cpu_model`` has swapped ``model``'s forward."""
    return "forward" in vars(model)


def _dummy_step(num_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           AttentionMetadata]:
    """One request's first ``num_tokens`` tokens in blocks 0, 1, ..."""
    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    metadata = AttentionMetadata(
        num_tokens=num_tokens, slot_mapping=torch.arange(num_tokens),
        query_start_loc=i32([0, num_tokens]), seq_lens=i32([num_tokens]),
        block_tables=i32([list(range(-(-num_tokens // block_size)))]),
        max_query_len=num_tokens, max_seq_len=num_tokens,
        query_lens_cpu=[num_tokens], seq_lens_cpu=[num_tokens])
    return torch.zeros(num_tokens, dtype=torch.long), torch.arange(num_tokens), metadata


def _warm_up_sizes(model: nn.Module) -> list[int]:
    """Step sizes that reach every graph: one token, two, the first size at which a quantized
    product takes its bfloat16 GEMM (``gemm_rows``), and the first of its larger row bucket."""
    from pagedllm.layers.quantization.int_weight_only import GEMM_TIER_ROWS

    gemm_rows = {m.method.gemm_rows for m in model.modules()
                 if hasattr(getattr(m, "method", None), "gemm_rows")}
    return sorted({1, 2, *gemm_rows, *({GEMM_TIER_ROWS} if gemm_rows else ())})


def _warm_up(runner, compiled) -> None:  # noqa: ANN001 (a ModelRunner)
    """Runs ``compiled`` on a step of each of ``_warm_up_sizes`` (the graphs)."""
    sizes = _warm_up_sizes(runner.model)
    blocks = -(-sizes[-1] // runner.block_size)
    cache_shape = (2, blocks, runner.block_size, runner.arch.num_kv_heads, runner.arch.head_dim)
    caches = [torch.zeros(cache_shape, dtype=runner.kv_caches[0].dtype)
              for _ in runner.kv_caches]
    with torch.inference_mode():
        for num_tokens in sizes:
            input_ids, positions, metadata = _dummy_step(num_tokens, runner.block_size)
            runner.backend.prepare(metadata, runner.block_size)
            with forward_context(ForwardContext(metadata, caches, runner.backend)):
                compiled(input_ids, positions)


def compile_cpu_model(runner) -> None:  # noqa: ANN001 (a ModelRunner)
    """Compiles ``runner.model`` and swaps its forward for the compiled one. Text models on one
    rank only (M-RoPE positions, image embeddings and collectives are not in the warm-up)."""
    if runner.arch.vision is not None or runner.arch.mrope_section or tp_size() > 1:
        logger.warning("--compile-cpu: only text models on one rank are compiled; this one "
                       "runs eagerly")
        return
    start = time.perf_counter()
    compiled = compile_model(runner.model)
    _warm_up(runner, compiled)
    runner.model.forward = compiled
    logger.info("CPU model compiled in %.1f s (inductor; attention an opaque op)",
                time.perf_counter() - start)
