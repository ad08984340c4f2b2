"""What a checkpoint's ``quantization_config`` says, and what pagedllm does with it.

Read by the engine at load (``resolve_quantization``) and by ``pagedllm plan`` (the weight bytes
of the stored format). pagedllm loads FP8 checkpoints whose weights carry a per-tensor or
per-channel scale: Hugging Face / vLLM's ``quant_method: fp8`` (without ``weight_block_size``),
``fbgemm_fp8``, and compressed-tensors' ``float-quantized`` 8-bit float weights with the
``tensor`` or ``channel`` strategy (what llm-compressor's FP8 recipes write). Their activation
scheme is always dynamic per token here (a static ``input_scale`` is not used). Integer formats
(AWQ, GPTQ, compressed-tensors int4/int8, bitsandbytes) are recognised so that ``plan`` can size
them and ``serve`` can refuse them by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CheckpointQuantization:
    """The stored format: ``method`` as pagedllm names it ("fp8", or the checkpoint's own name
    for a format it cannot load), ``bits`` per linear weight, and why it cannot be loaded."""

    method: str
    bits: int
    group_size: int | None = None  # integer formats: weights per scale
    unsupported: str | None = None  # None: pagedllm loads it


def checkpoint_quantization(hf_config: dict[str, Any]) -> CheckpointQuantization | None:
    """The format of ``hf_config["quantization_config"]``, or None for an unquantized
    checkpoint (the text config of a vision-language model is looked into too)."""
    qc = hf_config.get("quantization_config") or \
        (hf_config.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method in ("fp8", "fbgemm_fp8"):
        block = qc.get("weight_block_size")
        return CheckpointQuantization("fp8", 8, unsupported=None if not block else (
            f"block-wise FP8 scales (weight_block_size {block}) are not supported yet; "
            "pagedllm loads per-tensor and per-channel FP8 checkpoints"))
    if method in ("awq", "gptq", "gptq_marlin", "awq_marlin", "marlin"):
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        return CheckpointQuantization(method, bits, int(qc.get("group_size", qc.get(
            "q_group_size", 128))), f"{method.upper()} int{bits} checkpoints cannot be loaded "
            "yet")
    if method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8
        return CheckpointQuantization(method, bits, 64,
                                      "bitsandbytes checkpoints cannot be loaded")
    return CheckpointQuantization(method or "unknown", 16,
                                  unsupported=f"quantization method {method!r} is not supported")


def _compressed_tensors(qc: dict[str, Any]) -> CheckpointQuantization:
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not weights or not all(w.get("num_bits") == weights[0].get("num_bits") and
                              w.get("type") == weights[0].get("type") for w in weights):
        return CheckpointQuantization("compressed-tensors", 16, unsupported=(
            "compressed-tensors checkpoint with mixed or missing weight schemes"))
    w = weights[0]
    bits, kind, strategy = int(w.get("num_bits", 16)), w.get("type"), w.get("strategy")
    if kind == "float" and bits == 8:
        ok = strategy in ("tensor", "channel")
        return CheckpointQuantization("fp8", 8, unsupported=None if ok else (
            f"FP8 weights with the {strategy!r} strategy are not supported yet; pagedllm loads "
            "the 'tensor' and 'channel' strategies"))
    return CheckpointQuantization(
        f"compressed-tensors int{bits}", bits, w.get("group_size"),
        f"compressed-tensors {kind} {bits}-bit weights ({qc.get('format')}) cannot be loaded "
        "yet")


@dataclass(frozen=True)
class LoadQuantization:
    """How the engine loads a model: ``method`` runs the linear layers (None: unquantized);
    ``prequantized``: the checkpoint's tensors are already in that method's format."""

    method: str | None
    prequantized: bool


def resolve_quantization(hf_config: dict[str, Any], requested: str | None,
                         load_format: str = "auto", is_moe: bool = False) -> LoadQuantization:
    """``--quantization`` against the checkpoint's format. Random weights (``dummy``) take the
    checkpoint's method too, quantized from random model-dtype weights. Raises ValueError for a
    format pagedllm cannot load, or a flag that contradicts the checkpoint."""
    stored = checkpoint_quantization(hf_config)
    if stored is None:
        return LoadQuantization(requested, False)
    if load_format == "dummy" and stored.unsupported is None:
        return LoadQuantization(requested or stored.method, False)
    if stored.unsupported is not None:
        raise ValueError(f"This checkpoint is quantized ({stored.method}): "
                         f"{stored.unsupported}. Load an unquantized (bf16/fp16) checkpoint, "
                         "optionally with --quantization fp8.")
    if requested not in (None, stored.method):
        raise ValueError(f"--quantization {requested} contradicts the checkpoint, which is "
                         f"already quantized with {stored.method}: drop the flag.")
    if is_moe:
        raise ValueError("FP8 checkpoints of mixture-of-experts models are not supported yet "
                         "(the fused experts take model-dtype weights).")
    return LoadQuantization(stored.method, True)
