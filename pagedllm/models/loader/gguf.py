"""GGUF files: metadata -> HF-style config, tensors -> HF-named float weights.

llama.cpp names tensors ``blk.{i}.attn_q.weight`` and stores them with the dimensions reversed
(``[in, out]`` in ggml order, which numpy reads back as ``[out, in]``). For llama it also permutes
the rows of Q and K so that rotary pairs are adjacent; we undo that here so the weights are the
ones an HF checkpoint holds.
"""

from __future__ import annotations

import os
import re
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pagedllm.models.loader.gguf_file import GGUFFile, GGUFTensor

# general.architecture -> (HF architecture class, model_type)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# llama.cpp per-layer tensor name -> HF per-layer parameter name (without the ".weight"/".bias")
_LAYER_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


@lru_cache(maxsize=2)
def gguf_reader(path: str) -> GGUFFile:
    """One parsed, memory-mapped file per path, shared by the config, weights and tokenizer."""
    try:
        return GGUFFile(path)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot read {path} as a GGUF file: {e}") from e


def gguf_metadata(path: str, key: str, default: Any = None) -> Any:
    """The value stored under ``key`` (strings, numbers and arrays as Python values)."""
    return gguf_reader(path).metadata.get(key, default)


def gguf_architecture(path: str) -> str:
    arch = gguf_metadata(path, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF file {path} has architecture {arch!r}; pagedllm supports "
                         f"{sorted(_ARCHITECTURES)}.")
    return arch


def gguf_config(path: str) -> dict[str, Any]:
    """An HF-style config dict synthesized from the file's metadata."""
    arch = gguf_architecture(path)

    def meta(suffix: str, default: Any = None) -> Any:
        return gguf_metadata(path, f"{arch}.{suffix}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = meta("attention.head_count_kv", heads)
    head_dim = meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads
    vocab = meta("vocab_size") or len(gguf_metadata(path, "tokenizer.ggml.tokens", []))
    names = {t.name for t in gguf_reader(path).tensors}
    hf_arch, model_type = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": gguf_metadata(path, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_metadata(path, "tokenizer.ggml.eos_token_id"),
        "rope_scaling": _rope_scaling(path),
    }
    return config


# llama.cpp RoPE keys with no transformers counterpart for these architectures: refused unless
# they hold a value that leaves RoPE as transformers computes it.
_NEUTRAL_ROPE_KEYS: dict[str, tuple[float, ...]] = {
    "rope.scaling.attn_factor": (1.0,),
    "rope.scaling.yarn_log_multiplier": (0.0,),  # DeepSeek's mscale_all_dim
    "rope.scaling.yarn_ext_factor": (-1.0, 1.0),  # -1: llama.cpp's "1 for yarn"
    "rope.scaling.yarn_attn_factor": (1.0,),
}


def _rope_scaling(path: str) -> dict[str, Any]:
    """transformers-style rope parameters (what ``RopeScaling`` reads) from llama.cpp's
    ``rope.scaling.*`` metadata and ``rope_freqs.weight``: the per-frequency divisors in which
    llama.cpp's converter bakes Llama 3.x's llama3 scaling, kept as ``freq_factors``."""
    arch = gguf_architecture(path)

    def meta(suffix: str, default: Any = None) -> Any:
        return gguf_metadata(path, f"{arch}.{suffix}", default)

    kind, factor = meta("rope.scaling.type", "none"), meta("rope.scaling.factor")
    params: dict[str, Any] = {"rope_type": "default"}
    if kind == "linear" and factor not in (None, 1.0):  # linear x1 is plain RoPE
        params = {"rope_type": "linear", "factor": factor}
    elif kind == "yarn":
        params = {"rope_type": "yarn", "factor": factor,
                  "original_max_position_embeddings": meta("rope.scaling.original_context_length"),
                  "beta_fast": meta("rope.scaling.yarn_beta_fast"),
                  "beta_slow": meta("rope.scaling.yarn_beta_slow")}
    elif kind not in ("none", "linear"):
        raise ValueError(f"GGUF file {path} has {arch}.rope.scaling.type {kind!r}; pagedllm "
                         "applies none, linear and yarn (and rope_freqs.weight).")
    for key, neutral in _NEUTRAL_ROPE_KEYS.items():
        value = meta(key)
        if value is not None and value not in neutral:
            raise ValueError(f"GGUF file {path} sets {arch}.{key} = {value}, which pagedllm "
                             "does not apply.")
    freqs = next((t for t in gguf_reader(path).tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        params["freq_factors"] = _dequantize(freqs).reshape(-1).tolist()
    return {k: v for k, v in params.items() if v is not None}


def gguf_linear_weights_are_q4_1(path: str) -> bool:
    """Whether every 2-D weight of the file's decoder layers is Q4_1 (a scale and a min per 32
    inputs: what ``--quantization int4`` holds without loss; Q4_0 and Q4_K blocks would be
    requantized)."""
    from gguf.constants import GGMLQuantizationType

    types = {GGMLQuantizationType(t.tensor_type) for t in gguf_reader(path).tensors
             if _decoder_matrix(t)}
    return types == {GGMLQuantizationType.Q4_1}


def _decoder_matrix(tensor: GGUFTensor) -> bool:
    """A 2-D weight of a decoder layer (not the embedding's or the LM head's)."""
    return tensor.name.startswith("blk.") and len(tensor.shape) == 2


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name for a llama.cpp tensor name, or None for tensors we do not use."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of Q/K rows.

    llama.cpp reorders each head's rows from HF's "half split" layout [x0..x(d/2-1), y0..] to
    interleaved pairs [x0, y0, x1, y1, ...]. Rows are [n_heads * head_dim] (a bias is 1-D).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    tail = weight.shape[1:]
    # [n_heads, half, 2, ...] (interleaved) -> [n_heads, 2, half, ...] (half split)
    return weight.reshape(n_heads, half, 2, *tail).swapaxes(1, 2).reshape(weight.shape)


Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of two 4-bit q each, for 32 weights


def split_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [rows, blocks * 20] Q4_1 blocks -> (q uint8 [rows, blocks, 32] in 0..15, d and m
    float32 [rows, blocks, 1]) with w = d q + m: the low nibbles first (weights 0..15 of a
    block), then the high ones (16..31)."""
    blocks = blocks.view(blocks.shape[0], -1, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    packed = blocks[..., 4:]
    return torch.cat([packed & 15, packed >> 4], dim=-1), d, m


def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    """uint8 [rows, blocks * 20] Q4_1 blocks -> float32 [rows, blocks * 32]. The same values
    as ``gguf.quants.dequantize`` at ~2.5x its speed (torch vectorizes the nibbles), for the
    default model's 210 Q4_1 matrices: ~0.15 s of start-up instead of ~0.4 s (one thread)."""
    q, d, m = split_q4_1(torch.from_numpy(np.array(data)))
    return torch.addcmul(m, q.float(), d).reshape(data.shape[0], -1).numpy()


def _dequantize(tensor: GGUFTensor, keep_q4_1: bool = False) -> np.ndarray:
    """float32 values of the ggml shape reversed ([out, in] for a linear weight); with
    ``keep_q4_1``, a Q4_1 tensor as its raw blocks instead (uint8 [out, in / 32 * 20])."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type == GGMLQuantizationType.Q4_1:
        return tensor.data if keep_q4_1 else dequantize_q4_1(tensor.data).reshape(shape)
    array = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def _load_one(tensor: GGUFTensor, arch: str, heads: int, kv_heads: int, keep_q4_1: bool,
              ) -> tuple[str | None, np.ndarray | None]:
    name = hf_name(tensor.name)
    if name is None:
        return None, None
    array = _dequantize(tensor, keep_q4_1 and _decoder_matrix(tensor))
    if arch == "llama" and ".self_attn.q_proj." in name:
        array = unpermute_rows(array, heads)
    elif arch == "llama" and ".self_attn.k_proj." in name:
        array = unpermute_rows(array, kv_heads)
    if not array.flags.writeable:  # F32 tensors are views into the read-only memory map
        array = array.copy()
    return name, np.ascontiguousarray(array)


def iter_gguf_weights(path: str, dtype: torch.dtype = torch.float32, keep_q4_1: bool = False,
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight the model uses, dequantized to ``dtype``; with
    ``keep_q4_1``, the decoder layers' Q4_1 matrices come as their raw blocks (uint8 rows, for
    ``--quantization int4``, which holds them as they are: ``Int4LinearMethod.create_weights``;
    the embedding and the LM head are dequantized as ever).

    numpy releases the GIL while dequantizing, so a few tensors are decoded ahead on threads;
    at most ``workers`` results wait in memory at once.
    """
    from tqdm import tqdm

    arch = gguf_architecture(path)
    heads = int(gguf_metadata(path, f"{arch}.attention.head_count"))
    kv_heads = int(gguf_metadata(path, f"{arch}.attention.head_count_kv", heads))
    tensors = gguf_reader(path).tensors
    workers = min(8, os.cpu_count() or 1)
    progress = tqdm(total=len(tensors), desc="Loading GGUF weights", unit="tensor",
                    disable=True if len(tensors) < 64 else None)  # None: on a terminal only
    with ThreadPoolExecutor(workers) as pool, progress:
        pending: deque[Future[tuple[str | None, np.ndarray | None]]] = deque()
        for tensor in tensors:
            pending.append(pool.submit(_load_one, tensor, arch, heads, kv_heads, keep_q4_1))
            if len(pending) >= workers:
                yield from _finish(pending.popleft(), dtype, progress)
        while pending:
            yield from _finish(pending.popleft(), dtype, progress)


def _finish(future: Future[tuple[str | None, np.ndarray | None]], dtype: torch.dtype,
            progress: Any) -> Iterator[tuple[str, torch.Tensor]]:
    name, array = future.result()
    progress.update(1)
    if name is not None and array is not None:
        tensor = torch.from_numpy(array)
        yield name, tensor if tensor.dtype == torch.uint8 else tensor.to(dtype)
