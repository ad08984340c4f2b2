"""Sliding-window attention in the Llama-family decoder as transformers applies it: Mistral's
window on every layer, Qwen2's only with use_sliding_window and from max_window_layers on, for
prompts longer than the window, with the default schedule and in 16-token chunks; and with a
window on every layer, the KV cache manager freeing the blocks left of it as requests run."""

from __future__ import annotations

from typing import Any

import pytest

from pagedllm import LLM
from pagedllm.models.arch import ModelArch
from tests.models.conftest import (
    CHUNKED,
    MAX_TOKENS,
    hf_greedy,
    pagedllm_greedy,
    random_prompts,
    randomize,
    save_checkpoint,
)

VOCAB, WINDOW = 256, 8
PROMPTS = random_prompts((20, 37), VOCAB)
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, sliding_window=WINDOW, bos_token_id=None,
             eos_token_id=None)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "max_window_layers": 2}),
}
EXPECTED_WINDOWS = {"mistral": (WINDOW,) * 4, "qwen2": (0, 0, WINDOW, WINDOW)}


def _model(family: str, **overrides: Any) -> Any:
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**SHAPE, **extra, **overrides},
                                                architectures=[model_name])
    return randomize(getattr(transformers, model_name)(config))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(family: str, tmp_path_factory: pytest.TempPathFactory,
                                     ) -> None:
    model = _model(family)
    expected = [hf_greedy(model, p) for p in PROMPTS]
    unwindowed = _model(family, sliding_window=None)
    assert [hf_greedy(unwindowed, p) for p in PROMPTS] != expected  # the window matters
    folder = save_checkpoint(model, tmp_path_factory.mktemp(family), VOCAB)
    llm = LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    assert pagedllm_greedy(llm, PROMPTS) == expected
    chunked = LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20, **CHUNKED)
    assert pagedllm_greedy(chunked, PROMPTS) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_windows_per_layer(family: str) -> None:
    config = _model(family).config.to_dict()
    assert ModelArch.from_hf_config(config).sliding_windows == EXPECTED_WINDOWS[family]


@pytest.mark.parametrize("config,windows", [
    # Qwen2/Qwen3 publish a window with use_sliding_window false (or absent): no window
    ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": False}, (0,) * 4),
    ({"model_type": "qwen3", "sliding_window": 8}, (0,) * 4),
    # Mistral ignores layer_types, as transformers' Mistral does
    ({"model_type": "mistral", "sliding_window": 8,
      "layer_types": ["full_attention"] * 4}, (8,) * 4),
    # Gemma 3: all but every sliding_window_pattern-th layer; layer_types win where written
    ({"model_type": "gemma3_text", "sliding_window": 8, "sliding_window_pattern": 2},
     (8, 0, 8, 0)),
    ({"model_type": "gemma3_text", "sliding_window": 8,
      "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}, (8, 8, 8, 0)),
    # Phi-3-mini-4k: 2047 on every layer
    ({"model_type": "phi3", "sliding_window": 2047}, (2047,) * 4),
    ({"model_type": "llama"}, (0,) * 4),
])
def test_family_rules(config: dict[str, Any], windows: tuple[int, ...]) -> None:
    hf = {**SHAPE, "max_position_embeddings": 4096, "architectures": ["X"], **config}
    assert ModelArch.from_hf_config(hf).sliding_windows == windows


def _track_blocks(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Peaks, over the run, of the blocks one request holds after a prompt chunk and after a
    decode is scheduled, and of the blocks all requests hold (the pool's used blocks)."""
    kv = llm.engine.core.kv_cache
    peaks = {"prefill": 0, "decode": 0, "pool": 0}
    allocate = kv.allocate

    def tracked(request: Any, num_new_tokens: int, cached: Any = ()) -> bool:
        ok = allocate(request, num_new_tokens, cached)
        if ok:
            phase = "decode" if request.num_computed_tokens >= request.num_prompt_tokens \
                else "prefill"
            held = len(kv.held_block_ids(request.request_id))
            peaks[phase] = max(peaks[phase], held)
            peaks["pool"] = max(peaks["pool"], kv.pool.num_blocks - kv.num_free_blocks)
        return ok

    monkeypatch.setattr(kv, "allocate", tracked)
    return peaks


@pytest.mark.parametrize("window", [8, 16])
def test_blocks_left_of_the_window_are_freed(window: int, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mistral slides on every layer: with prompts several windows long, greedy tokens still
    equal transformers' while each request holds at most the blocks of its window (one more
    where the window straddles a block boundary) and of the step's tokens."""
    block_size = CHUNKED["block_size"]
    prompts = random_prompts((37, 61, 90), VOCAB)
    model = _model("mistral", sliding_window=window)
    expected = [hf_greedy(model, p) for p in prompts]
    folder = save_checkpoint(model, tmp_path_factory.mktemp("mistral"), VOCAB)
    without_window = sum(-(-(len(p) + MAX_TOKENS) // block_size) for p in prompts)
    for step_tokens, flags in ((max(map(len, prompts)), {"block_size": block_size}),
                               (CHUNKED["max_num_batched_tokens"], CHUNKED)):
        llm = LLM(folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20, **flags)
        peaks = _track_blocks(llm, monkeypatch)
        assert pagedllm_greedy(llm, prompts) == expected
        assert peaks["decode"] <= -(-window // block_size) + 1
        assert peaks["prefill"] <= -(-(window - 1 + step_tokens) // block_size) + 1
        assert peaks["pool"] < without_window
        kv = llm.engine.core.kv_cache
        assert kv.num_free_blocks == kv.pool.num_blocks
