"""--generation-config: the model folder's generation_config.json gives a server request's unset
sampling fields their defaults (auto, vLLM's default); vllm ignores it; a folder names another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedllm.engine.builder import build_frontend
from pagedllm.engine.generation_config import default_sampling_params
from pagedllm.entrypoints.openai.protocol_completion import CompletionRequest
from pagedllm.models.loader.source import resolve_model
from tests.models.conftest import randomize, save_checkpoint

RECOMMENDED = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True,
               "max_new_tokens": 10, "bos_token_id": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    folder = save_checkpoint(randomize(LlamaForCausalLM(config)),
                             tmp_path_factory.mktemp("genconfig"), 64)
    (Path(folder) / "generation_config.json").write_text(json.dumps(RECOMMENDED))
    return folder


def test_auto_reads_the_model_folder(model_dir: str) -> None:
    want = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 10}
    assert default_sampling_params(resolve_model(model_dir), "auto") == want
    assert build_frontend({"model": model_dir}).default_sampling == want


def test_vllm_ignores_it_and_a_gguf_has_none(model_dir: str, default_source) -> None:
    assert default_sampling_params(resolve_model(model_dir), "vllm") == {}
    assert default_sampling_params(default_source, "auto") == {}


def test_a_folder_without_one_is_an_error(model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--generation-config .*generation_config.json"):
        default_sampling_params(resolve_model(model_dir), str(tmp_path))


def test_request_fields_win_over_the_defaults() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.95}
    unset = CompletionRequest(model="m", prompt="hi").to_sampling_params(8, None,
                                                                         defaults=defaults)
    assert (unset.temperature, unset.top_p) == (0.6, 0.95)
    explicit = CompletionRequest(model="m", prompt="hi", temperature=0.0).to_sampling_params(
        8, None, defaults=defaults)
    assert (explicit.temperature, explicit.top_p) == (0.0, 0.95)


def test_max_new_tokens_caps_every_request() -> None:
    """vLLM's rule: a request's output is the smallest of its max_tokens, the room left in the
    context and the model's max_new_tokens."""
    from types import SimpleNamespace

    from pagedllm.entrypoints.openai.serving_base import OpenAIServing

    engine = SimpleNamespace(tokenizer=None, max_model_len=100,
                             default_sampling={"max_tokens": 10, "temperature": 0.6})
    serving = OpenAIServing(engine, ["m"])  # type: ignore[arg-type]
    assert serving.default_sampling == {"temperature": 0.6}
    assert serving.resolve_max_tokens(20, None, "prompt") == 10
    assert serving.resolve_max_tokens(20, 50, "prompt") == 10
    assert serving.resolve_max_tokens(20, 4, "prompt") == 4
    assert serving.resolve_max_tokens(95, None, "prompt") == 5
