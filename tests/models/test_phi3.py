"""Phi-3 / Phi-4 as transformers runs them: tiny random checkpoints with the fused qkv_proj and
gate_up_proj of the real ones, shaped as Phi-3-mini-4k (a sliding window on every layer) and
Phi-4-mini (longrope, 3/4 of each head rotated, tied embeddings), give transformers' greedy
tokens, with the default schedule and in 16-token chunks.

transformers' Phi-3 recomputes the whole cache with the long factors once a sequence crosses
original_max_position_embeddings (its prepare_inputs_for_generation); pagedllm keeps the short
rotation of the positions below it (layers/rotary.py), so sequences stay inside that window
here."""

from __future__ import annotations

from typing import Any

import pytest

from pagedllm import LLM
from pagedllm.models.arch import ModelArch
from pagedllm.worker.memory import count_parameters
from tests.models.conftest import (
    CHUNKED,
    hf_greedy,
    pagedllm_greedy,
    random_prompts,
    randomize,
    save_checkpoint,
)

VOCAB, HEAD_DIM, ORIGINAL = 256, 16, 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             original_max_position_embeddings=ORIGINAL, bos_token_id=None, eos_token_id=None,
             pad_token_id=None, architectures=["Phi3ForCausalLM"])
_PAIRS = 6  # rotary pairs of a 12-dim rotary part
VARIANTS: dict[str, dict[str, Any]] = {
    "phi-3-mini-4k": {"sliding_window": 8},
    "phi-4-mini": {"sliding_window": 262144, "partial_rotary_factor": 0.75,
                   "tie_word_embeddings": True,
                   "rope_scaling": {"rope_type": "longrope",
                                    "short_factor": [1.0 + 0.1 * i for i in range(_PAIRS)],
                                    "long_factor": [1.0 + 2.0 * i for i in range(_PAIRS)]}},
}
# prompts past the sliding window; prompt and output inside longrope's original window
PROMPT_LENGTHS = {"phi-3-mini-4k": (20, 37), "phi-4-mini": (20, ORIGINAL - 16)}
# what makes each variant: transformers' tokens change without it
WITHOUT = {"phi-3-mini-4k": {"sliding_window": None},
           "phi-4-mini": {"partial_rotary_factor": 1.0, "rope_scaling": None}}


def _model(variant: str, **overrides: Any) -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    params = {**SHAPE, **VARIANTS[variant], **overrides}
    params["rope_scaling"] = dict(params["rope_scaling"]) if params.get("rope_scaling") else None
    return randomize(Phi3ForCausalLM(Phi3Config(**params)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(variant: str,
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    model = _model(variant)
    assert "model.layers.0.self_attn.qkv_proj.weight" in model.state_dict()  # fused, as shipped
    prompts = random_prompts(PROMPT_LENGTHS[variant], VOCAB)
    expected = [hf_greedy(model, p) for p in prompts]
    plain = _model(variant, **WITHOUT[variant])
    assert [hf_greedy(plain, p) for p in prompts] != expected
    folder = save_checkpoint(model, tmp_path_factory.mktemp(variant), VOCAB)
    llm = LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    assert pagedllm_greedy(llm, prompts) == expected
    chunked = LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20, **CHUNKED)
    assert pagedllm_greedy(chunked, prompts) == expected


def test_arch_reads_phi4_mini() -> None:
    arch = ModelArch.from_hf_config(_model("phi-4-mini").config.to_dict())
    assert arch.rotary_dim == 12 and arch.rope_scaling.rope_type == "longrope"
    assert arch.sliding_windows == (262144,) * 4 and arch.tie_word_embeddings


def test_fused_tensor_of_the_wrong_size_is_a_clear_error(tmp_path_factory: pytest.TempPathFactory,
                                                         ) -> None:
    from safetensors.torch import load_file, save_file

    folder = save_checkpoint(_model("phi-3-mini-4k"), tmp_path_factory.mktemp("bad"), VOCAB)
    path = f"{folder}/model.safetensors"
    weights = load_file(path)
    name = "model.layers.1.mlp.gate_up_proj.weight"
    weights[name] = weights[name][:-1]
    save_file(weights, path)
    with pytest.raises(ValueError, match=f"{name}' has 255 rows; the config's gate_proj/up_proj "
                                         "need 256"):
        LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20)


def test_odd_rotary_part_is_refused() -> None:
    with pytest.raises(ValueError, match="partial_rotary_factor=0.2 gives 3 rotary dims"):
        ModelArch.from_hf_config({**SHAPE, "head_dim": HEAD_DIM, "partial_rotary_factor": 0.2,
                                  "model_type": "phi3"})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_planner_counts_transformers_parameters(variant: str) -> None:
    model = _model(variant)
    arch = ModelArch.from_hf_config(model.config.to_dict())
    assert count_parameters(arch) == sum(p.numel() for p in model.parameters())
