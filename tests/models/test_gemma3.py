"""Gemma 3 text as transformers runs it: a tiny random checkpoint of gemma-3-1b's shape (sliding
and full layers alternating, a window of 8 positions, q/k norms, the sliding layers on their
own RoPE base, linear RoPE scaling on the full ones) gives transformers' greedy tokens, for
prompts longer than the window, with the default schedule and in 16-token chunks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedllm import LLM
from pagedllm.models.arch import ModelArch, RopeScaling
from pagedllm.worker.memory import count_parameters
from tests.models.conftest import (
    CHUNKED,
    hf_greedy,
    pagedllm_greedy,
    random_prompts,
    randomize,
    save_checkpoint,
)

VOCAB, WINDOW = 256, 8
PROMPTS = random_prompts((20, 37), VOCAB)
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, sliding_window=WINDOW, sliding_window_pattern=2,
              query_pre_attn_scalar=24, rope_theta=10000.0, rope_local_base_freq=100.0,
              rope_scaling={"rope_type": "linear", "factor": 4.0},
              architectures=["Gemma3ForCausalLM"], bos_token_id=2, eos_token_id=1,
              pad_token_id=0)
# a feature off: transformers' tokens must differ from the full model's
WITHOUT = {"sliding window": {"sliding_window": 512},
           "local RoPE base": {"rope_local_base_freq": 10000.0},
           "RoPE scaling": {"rope_scaling": None}}


def _model(**overrides: Any) -> Any:
    """As test_gemma2's: random norm offsets, and a small tied embedding."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    params = {**CONFIG, **overrides}
    params["rope_scaling"] = dict(params["rope_scaling"]) if params["rope_scaling"] else None
    config = Gemma3TextConfig(**params, attn_implementation="eager")
    model = randomize(Gemma3ForCausalLM(config), std=0.2, vector_std=0.1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        model.model.embed_tokens.weight.normal_(0.0, 0.02, generator=generator)
    return model


@pytest.fixture(scope="module")
def model() -> Any:
    return _model()


@pytest.fixture(scope="module")
def expected(model: Any) -> list[list[int]]:
    return [hf_greedy(model, p) for p in PROMPTS]


@pytest.mark.parametrize("feature", list(WITHOUT))
def test_each_feature_changes_transformers_tokens(expected: list[list[int]],
                                                  feature: str) -> None:
    plain = _model(**WITHOUT[feature])
    assert [hf_greedy(plain, p) for p in PROMPTS] != expected


@pytest.mark.parametrize("engine_args", [{}, CHUNKED], ids=["default", "chunks-of-16"])
def test_greedy_matches_transformers(model: Any, expected: list[list[int]],
                                     engine_args: dict[str, int],
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = save_checkpoint(model, tmp_path_factory.mktemp("gemma3"), VOCAB)
    llm = LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20, **engine_args)
    assert pagedllm_greedy(llm, PROMPTS) == expected


@pytest.mark.parametrize("config", [
    # gemma-3-1b's config.json as published (transformers 4.50): flat RoPE keys, a pattern
    {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 2,
     "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    # as transformers 5 writes it: RoPE per layer type, layer_types listed
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
     "layer_types": ["sliding_attention", "full_attention"] * 2},
], ids=["transformers-4", "transformers-5"])
def test_both_config_spellings_read_alike(config: dict[str, Any]) -> None:
    base = {k: v for k, v in CONFIG.items() if not k.startswith("rope")}
    del base["sliding_window_pattern"]
    arch = ModelArch.from_hf_config({**base, "model_type": "gemma3_text", **config})
    assert arch.sliding_windows == (WINDOW, 0, WINDOW, 0) and arch.qk_norm
    assert (arch.rope_theta, arch.local_rope_theta) == (1e6, 1e4)
    assert arch.rope_scaling == RopeScaling(rope_type="linear", factor=8.0)
    assert arch.local_rope_scaling == RopeScaling() and arch.tie_word_embeddings


def test_planner_counts_transformers_parameters() -> None:
    model = _model()
    arch = ModelArch.from_hf_config(model.config.to_dict())
    assert count_parameters(arch) == sum(p.numel() for p in model.parameters())
