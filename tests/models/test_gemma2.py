"""Gemma 2 as transformers runs it: a tiny random checkpoint of gemma-2's shape (4 layers, so
sliding and full layers alternate; a window of 8 positions) gives transformers' greedy tokens,
for prompts longer than the window, with the default schedule and in 16-token chunks.

Each Gemma feature is shown to matter: transformers' own tokens change without it (the final
soft-cap, monotonic, changes no greedy token: its logprobs are compared instead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.models.arch import ModelArch
from pagedllm.worker.memory import count_parameters
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
PROMPT_LENGTHS = (20, 37)
# gemma-2-2b's config.json with the widths shrunk; caps small enough to bind (the tiny
# model's logits are small)
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, sliding_window=WINDOW, query_pre_attn_scalar=24,
              attn_logit_softcapping=2.0, final_logit_softcapping=0.3,
              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
              architectures=["Gemma2ForCausalLM"], bos_token_id=2, eos_token_id=1,
              pad_token_id=0)
# a feature off: transformers' tokens must differ from the full model's
WITHOUT = {"sliding window": {"sliding_window": 512},
           "attention soft-cap": {"attn_logit_softcapping": None},
           "query_pre_attn_scalar": {"query_pre_attn_scalar": 16}}


def _model(**overrides: Any) -> Any:
    """Norm weights (offsets from 1) random too. The tied embedding is kept small: as large as
    the other weights, a token's own embedding (x sqrt(hidden)) dominates its logits and every
    continuation repeats one token."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**{**CONFIG, **overrides}, attn_implementation="eager")
    model = randomize(Gemma2ForCausalLM(config), std=0.2, vector_std=0.1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        model.model.embed_tokens.weight.normal_(0.0, 0.02, generator=generator)
    return model


@dataclass(frozen=True)
class Checkpoint:
    folder: str
    prompts: list[list[int]]
    expected: list[list[int]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    model = _model()
    prompts = random_prompts(PROMPT_LENGTHS, VOCAB)
    expected = [hf_greedy(model, p) for p in prompts]
    return Checkpoint(save_checkpoint(model, tmp_path_factory.mktemp("gemma2"), VOCAB), prompts,
                      expected)


@pytest.mark.parametrize("feature", list(WITHOUT))
def test_each_feature_changes_transformers_tokens(checkpoint: Checkpoint, feature: str) -> None:
    model = _model(**WITHOUT[feature])
    assert [hf_greedy(model, p) for p in checkpoint.prompts] != checkpoint.expected


def test_arch_reads_the_gemma_config(checkpoint: Checkpoint) -> None:
    from pagedllm.models.loader import load_hf_config, resolve_model

    arch = ModelArch.from_hf_config(load_hf_config(resolve_model(checkpoint.folder)))
    assert arch.sliding_windows == (WINDOW, 0, WINDOW, 0)
    assert (arch.attn_logit_softcap, arch.final_logit_softcap) == (2.0, 0.3)
    assert arch.attention_scale == 24 ** -0.5 and arch.hidden_act == "gelu_pytorch_tanh"
    assert arch.tie_word_embeddings


def test_greedy_matches_transformers(checkpoint: Checkpoint) -> None:
    llm = LLM(checkpoint.folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    assert pagedllm_greedy(llm, checkpoint.prompts) == checkpoint.expected


def test_greedy_matches_transformers_in_chunks_of_16(checkpoint: Checkpoint) -> None:
    llm = LLM(checkpoint.folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20, **CHUNKED)
    assert pagedllm_greedy(llm, checkpoint.prompts) == checkpoint.expected


def test_logprobs_are_of_the_soft_capped_logits(checkpoint: Checkpoint) -> None:
    """Each sampled token's logprob equals transformers' log-softmax of its capped logits."""
    from transformers import Gemma2ForCausalLM

    model = Gemma2ForCausalLM.from_pretrained(checkpoint.folder, attn_implementation="eager")
    prompt = checkpoint.prompts[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logits = torch.cat(out.logits)  # [MAX_TOKENS, vocab], capped
    tokens = out.sequences[0, len(prompt):]
    expected = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    uncapped = (torch.atanh(logits / 0.3) * 0.3).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    assert not torch.allclose(uncapped, expected, atol=1e-2)  # the cap matters
    llm = LLM(checkpoint.folder, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    ours = [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
    torch.testing.assert_close(torch.tensor(ours), expected, rtol=0, atol=1e-4)


def test_published_config_without_layer_types_or_tie_key() -> None:
    """gemma-2-9b's config.json (transformers 4.42) lists neither layer_types nor
    tie_word_embeddings: even layers slide, and the output projection is the embedding."""
    config = {**CONFIG, "model_type": "gemma2", "num_hidden_layers": 6, "rope_theta": 10000.0}
    arch = ModelArch.from_hf_config(config)
    assert arch.sliding_windows == (WINDOW, 0) * 3 and arch.tie_word_embeddings


def test_planner_counts_transformers_parameters() -> None:
    model = _model()
    arch = ModelArch.from_hf_config(model.config.to_dict())
    assert count_parameters(arch) == sum(p.numel() for p in model.parameters())
