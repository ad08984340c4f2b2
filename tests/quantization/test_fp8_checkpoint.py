"""quantization_config -> the stored format, and how the engine loads it (or why it cannot)."""

from __future__ import annotations

import pytest

from pagedllm.layers.quantization.checkpoint import (
    CheckpointQuantization,
    LoadQuantization,
    checkpoint_quantization,
    resolve_quantization,
)


def compressed_tensors(bits: int, kind: str, strategy: str, fmt: str) -> dict:
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": kind, "strategy": strategy, "group_size": 128}}}}}


@pytest.mark.parametrize("config,expected", [
    ({}, None),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}},
     CheckpointQuantization("fp8", 8)),
    ({"quantization_config": {"quant_method": "fbgemm_fp8"}}, CheckpointQuantization("fp8", 8)),
    (compressed_tensors(8, "float", "channel", "float-quantized"),
     CheckpointQuantization("fp8", 8)),
    (compressed_tensors(8, "float", "tensor", "float-quantized"),
     CheckpointQuantization("fp8", 8)),
    # a vision-language model's text config carries it
    ({"text_config": {"quantization_config": {"quant_method": "fp8"}}},
     CheckpointQuantization("fp8", 8)),
])
def test_loadable_formats(config: dict, expected: CheckpointQuantization | None) -> None:
    assert checkpoint_quantization(config) == expected


@pytest.mark.parametrize("config,bits,reason", [
    (compressed_tensors(4, "int", "group", "pack-quantized"), 4, "int 4-bit weights"),
    (compressed_tensors(8, "float", "block", "float-quantized"), 8, "'block' strategy"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, 4, "AWQ int4"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, 4,
     "bitsandbytes"),
    ({"quantization_config": {"quant_method": "hqq"}}, 16, "'hqq' is not supported"),
])
def test_unloadable_formats_say_why(config: dict, bits: int, reason: str) -> None:
    stored = checkpoint_quantization(config)
    assert stored is not None and stored.bits == bits and reason in stored.unsupported
    with pytest.raises(ValueError, match="cannot be loaded|not supported"):
        resolve_quantization(config, None)


def test_resolution() -> None:
    fp8 = {"quantization_config": {"quant_method": "fp8"}}
    assert resolve_quantization({}, "fp8") == LoadQuantization("fp8", False)
    assert resolve_quantization(fp8, None) == LoadQuantization("fp8", True)
    assert resolve_quantization(fp8, "fp8") == LoadQuantization("fp8", True)
    # random weights of an FP8 model's shape: quantized from random bf16 weights
    assert resolve_quantization(fp8, None, "dummy") == LoadQuantization("fp8", False)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        resolve_quantization(fp8, None, is_moe=True)
