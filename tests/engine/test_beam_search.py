"""LLM.beam_search is vLLM's beam search, checked against a plain one over transformers' logits."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.engine.beam_search import beam_score

PROMPTS = ["The capital of France is", "Hello, my name is"]
EOS_PROMPT = "The capital of France is"  # "Paris." then EOS is among the best beams
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=128 * 2**20, max_model_len=512)


def _last_logprobs(hf_model, tokens: list[int]) -> torch.Tensor:
    """The next token's logprobs after ``tokens``, from the full sequence (no cache)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, -1].float()
    return logits.log_softmax(-1)


def reference_beam_search(hf_model, prompt: list[int], params: BeamSearchParams,
                          eos: int) -> list[tuple[list[int], float]]:
    """The algorithm written out plainly: (tokens incl. prompt, cum_logprob), best first."""
    width = params.beam_width
    beams: list[tuple[list[int], float]] = [(prompt, 0.0)]
    completed: list[tuple[list[int], float]] = []
    for _ in range(params.max_tokens):
        if not beams:
            break
        candidates = []
        for tokens, cum in beams:
            top = _last_logprobs(hf_model, tokens).topk(2 * width)
            for lp, token in zip(top.values.tolist(), top.indices.tolist()):
                if token == eos and not params.ignore_eos:
                    completed.append((tokens + [token], cum + lp))
                else:
                    candidates.append((tokens + [token], cum + lp))
        beams = sorted(candidates, key=lambda c: c[1], reverse=True)[:width]
    ranked = sorted(completed + beams, reverse=True,
                    key=lambda c: beam_score(c[0], c[1], eos, params.length_penalty))
    return ranked[:width]


def _assert_free(llm: LLM) -> None:
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"


def _assert_matches(llm: LLM, hf_model, prompts: list[str], params: BeamSearchParams) -> None:
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    outputs = llm.beam_search(prompts, params)
    assert len(outputs) == len(prompts)
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer.encode(prompt)
        want = reference_beam_search(hf_model, ids, params, eos)
        assert [s.tokens for s in out.sequences] == [w[0] for w in want], (prompt, params)
        for seq, (_, cum) in zip(out.sequences, want):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-3)
            assert seq.tokens[:len(ids)] == ids
            assert len(seq.logprobs) == len(seq.tokens) - len(ids)
            ended = seq.tokens[-1] == eos and not params.ignore_eos
            assert seq.finish_reason == ("stop" if ended else "length")
            assert seq.text == tokenizer.decode(seq.tokens[:-1] if ended else seq.tokens,
                                                skip_special_tokens=False)
        scores = [beam_score(s.tokens, s.cum_logprob, eos, params.length_penalty)
                  for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
    _assert_free(llm)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_equals_reference(llm, hf_model, width):
    _assert_matches(llm, hf_model, PROMPTS, BeamSearchParams(width, MAX_TOKENS))


def test_length_penalty_equals_reference(llm, hf_model):
    for penalty in (0.5, 2.0):
        _assert_matches(llm, hf_model, [EOS_PROMPT],
                        BeamSearchParams(3, MAX_TOKENS, length_penalty=penalty))


def test_width_one_is_greedy(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = llm.generate(PROMPTS, greedy, use_tqdm=False)
    got = llm.beam_search(PROMPTS, BeamSearchParams(1, MAX_TOKENS, ignore_eos=True))
    for w, g in zip(want, got):
        (seq,) = g.sequences
        assert seq.output_token_ids == w.outputs[0].token_ids
        assert seq.cum_logprob == pytest.approx(
            sum(lp[t].logprob for lp, t in zip(seq.logprobs, seq.output_token_ids)))
    _assert_free(llm)


def test_eos_ends_a_beam_unless_ignored(llm, hf_model):
    eos = llm.get_tokenizer().eos_token_id
    (stopped,) = llm.beam_search(EOS_PROMPT, BeamSearchParams(3, MAX_TOKENS))
    ended = [s for s in stopped.sequences if s.finish_reason == "stop"]
    assert ended, "the prompt must have a beam that EOS ends"
    for s in ended:
        assert s.tokens[-1] == eos and s.stop_reason == eos and len(s.logprobs) < MAX_TOKENS
        assert eos not in s.tokens[:-1]
    _assert_matches(llm, hf_model, [EOS_PROMPT], BeamSearchParams(3, MAX_TOKENS))

    (ignored,) = llm.beam_search(EOS_PROMPT, BeamSearchParams(3, MAX_TOKENS, ignore_eos=True))
    assert all(s.finish_reason == "length" and len(s.logprobs) == MAX_TOKENS
               for s in ignored.sequences)
    _assert_matches(llm, hf_model, [EOS_PROMPT],
                    BeamSearchParams(3, MAX_TOKENS, ignore_eos=True))


def test_include_stop_str_keeps_eos_text(llm):
    tokenizer = llm.get_tokenizer()
    (out,) = llm.beam_search(EOS_PROMPT, BeamSearchParams(3, MAX_TOKENS,
                                                          include_stop_str_in_output=True))
    ended = next(s for s in out.sequences if s.finish_reason == "stop")
    assert ended.text == tokenizer.decode(ended.tokens, skip_special_tokens=False)
    assert ended.text.endswith(tokenizer.decode([tokenizer.eos_token_id],
                                                skip_special_tokens=False))


def test_bad_params_are_refused(llm):
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(0, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(2, 0)
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search(PROMPTS, BeamSearchParams(11, 4))  # 22 logprobs > max_logprobs 20
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search(PROMPTS, BeamSearchParams(2, 510))
