"""Structured outputs through the real engine (default model, CPU): outputs match their grammar
with sampling, n > 1, chunked prefill, preemption, async scheduling and the engine core in a
process of its own."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.messages import EngineCoreRequest
from pagedllm.sampling_params import StructuredOutputsParams as Structured

pytestmark = pytest.mark.slow

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "none"]}},
    "required": ["name", "age", "pet"], "additionalProperties": False}
GRAMMAR = 'root ::= "(" num " " op " " num ")"\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
BLOCK_BYTES = 30 * 2 * 3 * 64 * 4 * 16  # one KV block of the default model in float32


def _json(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


def _check(outputs, params: list[SamplingParams]) -> None:
    for out, p in zip(outputs, params, strict=True):
        spec = p.structured_outputs
        for sample in out.outputs:
            text = sample.text
            assert sample.finish_reason == "stop", (text, sample.finish_reason)
            if spec.json is not None:
                _json(text)
            elif spec.regex is not None:
                assert re.fullmatch(spec.regex, text), text
            elif spec.choice is not None:
                assert text in spec.choice
            elif spec.grammar is not None:
                assert re.fullmatch(r"\([1-9][0-9]? [+*-] [1-9][0-9]?\)", text), text
            else:
                assert isinstance(json.loads(text), dict)


def _requests() -> tuple[list[str], list[SamplingParams]]:
    specs = [
        ("Describe a person as JSON.", Structured(json=PERSON, disable_any_whitespace=True), 0.0),
        ("Describe a person as JSON.", Structured(json=json.dumps(PERSON)), 0.9),
        ("Give me a date.", Structured(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"), 0.9),
        ("Is the sky blue?", Structured(choice=["yes", "no", "maybe"]), 0.9),
        ("Write a sum.", Structured(grammar=GRAMMAR), 0.9),
        ('Reply with the JSON object {"a": 1}.', Structured(json_object=True,
                                                             disable_any_whitespace=True), 0.0),
    ]
    prompts = [CHAT.format(text) for text, _, _ in specs]
    # n = 2 on the sampled JSON schema: each sample has a matcher of its own
    params = [SamplingParams(temperature=t, seed=i, max_tokens=64, n=2 if i == 1 else 1,
                             structured_outputs=s) for i, (_, s, t) in enumerate(specs)]
    return prompts, params


def test_outputs_match_their_grammar_with_n_and_masks():
    llm = LLM(max_model_len=512, kv_cache_memory_bytes=256 * 2**20)
    prompts, params = _requests()
    vocab = {28, 216, 253, 314}
    prompts += [CHAT.format("Count."), CHAT.format("Name a color.")]
    params += [SamplingParams(temperature=0.9, seed=3, max_tokens=6,
                              allowed_token_ids=sorted(vocab)),
               SamplingParams(temperature=0.0, max_tokens=12, bad_words=["popular"])]
    unconstrained = llm.generate(prompts[-1], SamplingParams(temperature=0.0, max_tokens=12),
                                 use_tqdm=False)[0].outputs[0]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _check(outputs[:-2], params[:-2])
    assert len(outputs[1].outputs) == 2
    assert set(outputs[-2].outputs[0].token_ids) <= vocab
    banned = llm.get_tokenizer().encode(" popular", add_special_tokens=False)
    assert " popular" in unconstrained.text  # greedy says it: the ban must change that
    ids = list(outputs[-1].outputs[0].token_ids)
    assert all(ids[i:i + len(banned)] != banned for i in range(len(ids)))
    with pytest.raises(ValueError, match="structured_outputs.json"):
        llm.generate("x", SamplingParams(structured_outputs=Structured(json={"type": "objec"})))
    # aborted while its grammar compiles: nothing of it is left behind
    core = llm.engine.core
    fresh = Structured(json={"type": "array", "items": {"type": "integer"}, "maxItems": 7})
    core.add_request(EngineCoreRequest("aborted", [1, 2, 3], SamplingParams(
        structured_outputs=fresh), 0.0))
    core.abort_requests(["aborted"])
    assert not core.has_unfinished_requests() and not core._exact
    kv = core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"
    assert not core.structured._masks, "matchers leaked"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_constraint_survives_preemption_and_chunked_prefill(async_scheduling):
    # 12 blocks of 16 tokens for 3 requests of ~80-token prompts and ~40-token answers: they
    # must preempt each other; 32-token steps cut every prompt into chunks.
    llm = LLM(max_model_len=192, kv_cache_memory_bytes=12 * BLOCK_BYTES,
              max_num_batched_tokens=32, max_num_seqs=8, enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    filler = "Here is some context that makes the prompt long enough to need chunks. " * 4
    prompts = [CHAT.format(filler + f"Person {i}: describe them as JSON.") for i in range(3)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=60,
                             structured_outputs=Structured(json=PERSON,
                                                           disable_any_whitespace=True))
              for i in range(3)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    _check(outputs, params)


def test_in_an_engine_process():
    llm = LLM(max_model_len=256, kv_cache_memory_bytes=64 * 2**20, engine_process=True)
    prompts, params = _requests()
    _check(llm.generate(prompts[2:5], params[2:5], use_tqdm=False), params[2:5])


@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_tokens": 3}])
def test_the_end_of_its_grammar_ends_a_request(extra: dict) -> None:
    """ignore_eos or min_tokens would keep a request going past its grammar's end (found by the
    schema fuzzer: a guided choice with either stopped the step with an error). The grammar wins:
    the request ends there as "stop", whatever its sampling asked."""
    llm = LLM(max_model_len=256, kv_cache_memory_bytes=64 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=8, n=2, seed=1,
                            structured_outputs=Structured(choice=["yes", "no"]), **extra)
    out = llm.generate(CHAT.format("Is the sky blue?"), params, use_tqdm=False)[0]
    for sample in out.outputs:
        assert sample.finish_reason == "stop"
        assert sample.text.strip() in ("yes", "no") or "min_tokens" in extra, sample.text
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks
