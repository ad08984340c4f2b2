"""RoPE scaling as transformers computes it (llama3, linear, dynamic, yarn, longrope): the
cos/sin table row for row, and tiny random Llama checkpoints' greedy tokens token for token, with
prompts past original_max_position_embeddings; GGUF's rope_freqs and rope.scaling metadata."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pagedllm import LLM
from pagedllm.layers.rotary import RotaryEmbedding, rope_frequencies
from pagedllm.models.arch import ModelArch, RopeScaling
from pagedllm.models.loader import ModelSource, load_hf_config, resolve_model
from tests.models.conftest import (
    CHUNKED,
    hf_greedy,
    pagedllm_greedy,
    random_prompts,
    randomize,
    save_checkpoint,
)

HEAD_DIM, MAX_POSITIONS, ORIGINAL, VOCAB, THETA = 16, 128, 32, 256, 500.0
_SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
_LONG = [1.0 + 1.5 * i for i in range(HEAD_DIM // 2)]

# rope_scaling as a real config writes it, the original window shrunk to 32 positions
SCALINGS: dict[str, dict[str, Any]] = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "short_factor": _SHORT, "long_factor": _LONG,
                 "original_max_position_embeddings": ORIGINAL},
}
# the optional parameters of yarn and longrope, checked on the table only
TABLE_ONLY: dict[str, dict[str, Any] | None] = {
    "default": None,
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0,
                    "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9,
                              "original_max_position_embeddings": ORIGINAL},
    "longrope-factor": {"rope_type": "longrope", "short_factor": _SHORT, "long_factor": _LONG,
                        "factor": 8.0, "original_max_position_embeddings": ORIGINAL},
}
# prompt lengths: inside the original window (decoding crosses it), on its edge, past it
PROMPT_LENGTHS = {"longrope": (20, ORIGINAL)}  # longer longrope prompts: see the last test
DEFAULT_LENGTHS = (20, 48, 70)


def _config(rope_scaling: dict[str, Any] | None) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS, rope_theta=THETA,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # transformers edits it
        architectures=["LlamaForCausalLM"], bos_token_id=None, eos_token_id=None)


def _arch(rope_scaling: dict[str, Any] | None) -> ModelArch:
    return ModelArch.from_hf_config(_config(rope_scaling).to_dict())


def _ours(arch: ModelArch) -> RotaryEmbedding:
    return RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                           arch.rope_scaling)


def _transformers_table(config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos, sin [MAX_POSITIONS, HEAD_DIM]: one forward for a prompt that fills the
    original window, one for the positions past it (what its decode steps see)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1)
    parts = [rotary(x, torch.arange(lo, hi)[None])
             for lo, hi in ((0, ORIGINAL), (ORIGINAL, MAX_POSITIONS))]
    return torch.cat([c[0] for c, _ in parts]), torch.cat([s[0] for _, s in parts])


@pytest.mark.parametrize("name", [*SCALINGS, *TABLE_ONLY])
def test_cos_sin_table_equals_transformers(name: str) -> None:
    scaling = {**SCALINGS, **TABLE_ONLY}[name]
    ours = _ours(_arch(scaling))
    cos, sin = _transformers_table(_config(scaling))
    assert torch.equal(ours.cos, cos) and torch.equal(ours.sin, sin)
    plain = _ours(_arch(None))
    # dynamic changes nothing below max_position_embeddings (the module docstring says why)
    assert torch.equal(ours.cos, plain.cos) == (name in ("default", "dynamic"))


def test_real_llama_31_config_gives_transformers_frequencies() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    folder = Path(__file__).parents[2] / "benchmarks" / "configs" / "llama-3.1-8b"
    arch = ModelArch.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert arch.rope_scaling == RopeScaling(
        rope_type="llama3", factor=8.0, original_max_position_embeddings=8192,
        low_freq_factor=1.0, high_freq_factor=4.0)
    inv_freq, attention_factor = rope_frequencies(
        arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
    assert torch.equal(inv_freq, LlamaRotaryEmbedding(LlamaConfig.from_pretrained(folder)).inv_freq)
    assert attention_factor == 1.0


def test_transformers_4_and_5_spellings_read_alike() -> None:
    v4 = {"rope_theta": THETA, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": ORIGINAL}}
    v5 = {"rope_parameters": {"rope_theta": THETA, "rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": ORIGINAL}}
    assert RopeScaling.from_hf_config(v4, 128) == RopeScaling.from_hf_config(v5, 128)
    # Qwen2-VL's M-RoPE has plain frequencies; its sections are read beside them
    mrope = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    assert RopeScaling.from_hf_config(mrope, 128) == RopeScaling()
    # Phi-3 writes original_max_position_embeddings at the top level, and it wins
    phi3 = {"original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "short_factor": _SHORT, "long_factor": _LONG}}
    parsed = RopeScaling.from_hf_config(phi3, 131072)
    assert parsed.original_max_position_embeddings == 4096 and parsed.factor == 32.0


def test_unknown_rope_type_is_a_clear_error_at_load(tmp_path: Path) -> None:
    config = _config(None).to_dict()
    config["rope_parameters"] = {"rope_theta": THETA, "rope_type": "ntk-by-parts"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'ntk-by-parts'.*not supported.*default, linear, "
                                         r"dynamic, yarn, longrope, llama3"):
        LLM(str(tmp_path), dtype="float32")
    with pytest.raises(ValueError, match=r"'llama3' needs \['low_freq_factor'\]"):
        RopeScaling.from_hf_config({"rope_scaling": {**SCALINGS["llama3"],
                                                     "low_freq_factor": None}}, 128)


def test_per_pair_factors_of_the_wrong_length_are_a_clear_error() -> None:
    scaling = RopeScaling(rope_type="longrope", original_max_position_embeddings=ORIGINAL,
                          short_factor=(1.0,) * 3, long_factor=tuple(_LONG))
    with pytest.raises(ValueError, match="short_factor has 3 values; head_dim 16 needs 8"):
        RotaryEmbedding(HEAD_DIM, MAX_POSITIONS, THETA, scaling)


# --- greedy tokens against transformers' generate ---------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    folder: str
    prompts: list[list[int]]
    expected: list[list[int]]


def _random_model(rope_scaling: dict[str, Any] | None) -> Any:
    from transformers import LlamaForCausalLM

    return randomize(LlamaForCausalLM(_config(rope_scaling)))


def _save(model: Any, folder: Path) -> str:
    return save_checkpoint(model, folder, VOCAB)


def _prompts(lengths: tuple[int, ...]) -> list[list[int]]:
    return random_prompts(lengths, VOCAB)


@pytest.fixture(scope="module", params=list(SCALINGS))
def checkpoint(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    name = request.param
    model = _random_model(SCALINGS[name])
    prompts = _prompts(PROMPT_LENGTHS.get(name, DEFAULT_LENGTHS))
    expected = [hf_greedy(model, p) for p in prompts]
    if name != "dynamic":  # the scaling matters: plain RoPE gives other tokens
        plain = _random_model(None)
        assert [hf_greedy(plain, p) for p in prompts] != expected
    return Checkpoint(_save(model, tmp_path_factory.mktemp(name)), prompts, expected)


def test_greedy_matches_transformers(checkpoint: Checkpoint) -> None:
    llm = LLM(checkpoint.folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    assert pagedllm_greedy(llm, checkpoint.prompts) == checkpoint.expected


def test_greedy_matches_transformers_in_chunks_of_16(checkpoint: Checkpoint) -> None:
    llm = LLM(checkpoint.folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20, **CHUNKED)
    assert pagedllm_greedy(llm, checkpoint.prompts) == checkpoint.expected


def test_longrope_prompt_past_the_window_uses_long_factors_from_it_on(tmp_path: Path) -> None:
    """transformers rotates a prompt longer than the original window with the long factors
    throughout; pagedllm's rows depend on the position only (short below the window). The
    reference is transformers' model with that table in place of its rotary embedding."""
    model = _random_model(SCALINGS["longrope"])
    prompts = _prompts((48, 70))
    transformers_tokens = [hf_greedy(model, p) for p in prompts]
    table = _ours(_arch(SCALINGS["longrope"]))
    model.model.rotary_emb.forward = lambda x, position_ids: (
        table.cos[position_ids].to(x.dtype), table.sin[position_ids].to(x.dtype))
    expected = [hf_greedy(model, p) for p in prompts]
    assert expected != transformers_tokens  # the documented difference is real
    llm = LLM(_save(model, tmp_path), dtype="float32", kv_cache_memory_bytes=8 * 2**20,
              max_num_batched_tokens=16, max_num_seqs=4)
    assert pagedllm_greedy(llm, prompts) == expected


# --- GGUF: rope_freqs.weight and rope.scaling metadata ------------------------------------------

def _llama3_rope_freqs(rope: dict[str, Any]) -> list[float]:
    """llama.cpp's convert_hf_to_gguf.py for Llama 3.x: the divisor of each inverse frequency."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    freqs = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    divisors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return divisors


def _write_gguf(path: Path, metadata: dict[str, Any], rope_freqs: list[float] | None) -> str:
    """A llama GGUF holding the numbers gguf_config reads (no weights: only the config is
    loaded), plus ``llama.rope.*`` metadata and the rope_freqs tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(MAX_POSITIONS)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(HEAD_DIM)
    writer.add_rope_freq_base(THETA)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(f"llama.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"llama.{key}", value)
        else:
            writer.add_float32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 64), dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.array(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _gguf_arch(path: str) -> ModelArch:
    return ModelArch.from_hf_config(load_hf_config(resolve_model(path)))


def test_gguf_rope_freqs_give_the_llama3_table(tmp_path: Path) -> None:
    rope_freqs = _llama3_rope_freqs(SCALINGS["llama3"])
    arch = _gguf_arch(_write_gguf(tmp_path / "llama3.gguf", {}, rope_freqs))
    assert arch.rope_scaling.rope_type == "default" and arch.rope_scaling.freq_factors
    cos, sin = _transformers_table(_config(SCALINGS["llama3"]))
    ours = _ours(arch)
    # the same frequencies, factored the other way round: equal up to float32 rounding
    torch.testing.assert_close(ours.cos, cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.sin, sin, rtol=0, atol=1e-5)
    assert not torch.allclose(ours.cos, _ours(_arch(None)).cos, atol=1e-2)


@pytest.mark.parametrize("name,metadata", [
    ("linear", {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}),
    ("yarn", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
              "rope.scaling.original_context_length": ORIGINAL,
              "rope.scaling.yarn_ext_factor": 1.0}),
])
def test_gguf_scaling_metadata_reads_as_the_hf_config(tmp_path: Path, name: str,
                                                      metadata: dict[str, Any]) -> None:
    arch = _gguf_arch(_write_gguf(tmp_path / f"{name}.gguf", metadata, None))
    assert arch.rope_scaling == _arch(SCALINGS[name]).rope_scaling


@pytest.mark.parametrize("metadata,match", [
    ({"rope.scaling.type": "longrope"}, "rope.scaling.type 'longrope'"),
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
      "rope.scaling.yarn_log_multiplier": 0.1}, "yarn_log_multiplier"),
])
def test_gguf_scaling_pagedllm_cannot_apply_is_refused(tmp_path: Path, metadata: dict[str, Any],
                                                       match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _gguf_arch(_write_gguf(tmp_path / "refused.gguf", metadata, None))


def test_default_gguf_has_plain_rope(default_source: ModelSource) -> None:
    assert ModelArch.from_hf_config(load_hf_config(default_source)).rope_scaling == RopeScaling()
