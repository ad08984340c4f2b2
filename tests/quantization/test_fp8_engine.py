"""FP8 through the whole engine on the CPU (emulated, the GPU's arithmetic; the CPU even where a
GPU is, whose engine benchmarks/gpu_fp8.py measures): --quantization fp8 and --kv-cache-dtype
fp8 score a prompt close to the model dtype; the FP8 cache holds 4x the tokens of a float32 one;
FP8 checkpoints (compressed-tensors per-channel, quant_method fp8 per-tensor) load into the same
layers as quantizing at load; formats pagedllm cannot load are refused by name."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.fp8 import quantize, quantize_rows_ref
from tests.models.conftest import randomize, save_checkpoint

VOCAB = 256
PROMPT = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(0)).tolist()
SCORE = SamplingParams(max_tokens=1, prompt_logprobs=0)
KV_BYTES = 1 << 20
CPU = {"device": "cpu", "kv_cache_memory_bytes": KV_BYTES}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("llama")
    save_checkpoint(randomize(LlamaForCausalLM(config), std=0.05), folder, VOCAB)
    return folder


def prompt_logprobs(model: Path, **kwargs) -> torch.Tensor:
    """The logprob of each prompt token given the ones before it (teacher forcing)."""
    llm = LLM(str(model), **CPU, **kwargs)
    out = llm.generate([PROMPT], SCORE, use_tqdm=False)[0]
    return torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], PROMPT[1:])])


@pytest.mark.parametrize("kwargs", [{"quantization": "fp8"}, {"kv_cache_dtype": "fp8"}])
def test_fp8_scores_close_to_the_model_dtype(checkpoint: Path, kwargs: dict) -> None:
    exact = prompt_logprobs(checkpoint)
    diff = (prompt_logprobs(checkpoint, **kwargs) - exact).abs()
    assert 0 < diff.mean() < 0.05 and diff.max() < 0.3, diff


def test_fp8_kv_cache_holds_4x_the_float32_tokens(checkpoint: Path, caplog) -> None:
    tokens = []
    for kv in ("auto", "fp8"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            LLM(str(checkpoint), **CPU, kv_cache_dtype=kv)
        line = next(r.getMessage() for r in caplog.records if "KV cache size" in r.getMessage())
        tokens.append(int(re.search(r"([\d,]+) tokens", line).group(1).replace(",", "")))
    assert tokens[1] == 4 * tokens[0]


def _fp8_checkpoint(src: Path, dst: Path, quantization_config: dict, per_channel: bool) -> Path:
    """``src``'s linear layers in FP8: per-channel scales [N, 1] or per-tensor scalars (with a
    static input scale, which pagedllm does not use)."""
    dst.mkdir()
    tensors = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if not re.search(r"_proj\.weight$", name):
            tensors[name] = w
            continue
        if per_channel:
            tensors[name], scale = quantize_rows_ref(w)
        else:
            scale = w.float().abs().amax() / 448
            tensors[name] = quantize(w, scale)
            tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.02)
        tensors[name + "_scale"] = scale.float()
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    return dst


COMPRESSED_TENSORS_FP8 = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True}}}}


def test_per_channel_checkpoint_equals_quantizing_at_load(checkpoint: Path,
                                                          tmp_path: Path) -> None:
    fp8 = _fp8_checkpoint(checkpoint, tmp_path / "ct", COMPRESSED_TENSORS_FP8, True)
    assert torch.equal(prompt_logprobs(fp8), prompt_logprobs(checkpoint, quantization="fp8"))


def test_per_tensor_checkpoint_loads(checkpoint: Path, tmp_path: Path, caplog) -> None:
    fp8 = _fp8_checkpoint(checkpoint, tmp_path / "pt",
                          {"quant_method": "fp8", "activation_scheme": "static"}, False)
    with caplog.at_level(logging.WARNING):
        scores = prompt_logprobs(fp8)
    assert "input_scale" in caplog.text  # said, not silently dropped
    diff = (scores - prompt_logprobs(checkpoint)).abs()
    assert diff.mean() < 0.1, diff


@pytest.mark.parametrize("quantization_config,kwargs,match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, {}, "AWQ int4"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, {}, "GPTQ int4"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, {}, "block-wise"),
    ({"quant_method": "fp8"}, {"quantization": "int8"}, "contradicts"),
])
def test_unloadable_checkpoints_are_refused(checkpoint: Path, tmp_path: Path,
                                            quantization_config: dict, kwargs: dict,
                                            match: str) -> None:
    folder = tmp_path / "q"
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json"):
        (folder / name).symlink_to(checkpoint / name)
    with pytest.raises(ValueError, match=match):
        LLM(str(folder), **CPU, **kwargs)
