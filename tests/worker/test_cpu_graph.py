"""The compiled CPU step (worker/cpu_graph.py) computes what the eager model computes: the same
greedy tokens over chunked prompts and mixed prefill/decode steps, on a tiny random Llama with
int4 weights; and the policy compiles quantized CPU models only, when asked."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM
from pagedllm.worker import cpu_graph
from tests.models.conftest import (
    CHUNKED,
    pagedllm_greedy,
    random_prompts,
    randomize,
    save_checkpoint,
)

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    # widths the int4 kernel takes: inputs in groups of 32, outputs in 16s
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    model = randomize(LlamaForCausalLM(config))
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny-llama"), VOCAB)


def test_compiled_step_gives_the_eager_tokens(tiny_llama: str) -> None:
    # Without prefix caching both runs schedule the same steps: a cached prefix would change
    # how many rows a product has, hence its kernel (int4 or bfloat16 GEMM) and its rounding.
    llm = LLM(tiny_llama, quantization="int4", kv_cache_memory_bytes=8 * 2**20,
              enable_prefix_caching=False, **CHUNKED)
    prompts = random_prompts((5, 23, 40, 9), VOCAB)  # 16-token steps: chunks beside decodes
    eager = pagedllm_greedy(llm, prompts)
    model = llm.engine.core.runner.model
    assert not cpu_graph.is_compiled(model)
    cpu_graph.compile_cpu_model(llm.engine.core.runner)
    assert cpu_graph.is_compiled(model)
    assert pagedllm_greedy(llm, prompts) == eager


@pytest.mark.parametrize(("device", "quantization", "asked", "expected"), [
    ("cpu", "int4", True, True), ("cpu", "int8", True, True), ("cpu", None, True, False),
    ("cpu", "int4", False, False), ("cuda", "int4", True, False)])
def test_only_quantized_cpu_models_compile(device: str, quantization: str | None, asked: bool,
                                           expected: bool) -> None:
    assert cpu_graph.should_compile(torch.device(device), quantization, asked) is expected
