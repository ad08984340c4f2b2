"""Logprobs and prompt logprobs equal log_softmax of transformers' float32 logits.

Each generated token's entry holds the chosen token (its logprob and rank among the whole
vocabulary) plus the top-k; prompt logprobs score prompt token i from position i - 1, so the
first entry is None.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams

ATOL = 1e-4
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=256 * 2**20, max_model_len=1024)


def hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab]: row i is the distribution of the token after position i."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    return logits.float().log_softmax(dim=-1)


def check_entry(entry, token: int, row: torch.Tensor, k: int, tok) -> None:
    """One position's logprobs against the reference distribution ``row``."""
    assert token in entry
    want = float(row[token])
    assert entry[token].logprob == pytest.approx(want, abs=ATOL)
    assert entry[token].rank == int((row > row[token]).sum()) + 1
    assert entry[token].decoded_token == tok.decode([token], skip_special_tokens=False)
    top_lp, top_ids = row.topk(k)
    assert set(entry) == {token, *top_ids.tolist()}
    for rank, (tid, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
        assert entry[tid].logprob == pytest.approx(lp, abs=ATOL)
        assert entry[tid].rank == rank


def test_greedy_logprobs_and_prompt_logprobs_match_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=5,
                            prompt_logprobs=3)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        prompt, comp = out.prompt_token_ids, out.outputs[0]
        gen = comp.token_ids
        ref = hf_logprobs(hf_model, prompt + gen[:-1])
        assert len(comp.logprobs) == len(gen) == 5
        for j, token in enumerate(gen):
            row = ref[len(prompt) - 1 + j]
            assert token == int(row.argmax())  # greedy: the reference model's argmax
            check_entry(comp.logprobs[j], token, row, 5, tok)
            assert comp.logprobs[j][token].rank == 1
        assert comp.cumulative_logprob == pytest.approx(
            sum(float(ref[len(prompt) - 1 + j, t]) for j, t in enumerate(gen)), abs=5 * ATOL)

        assert len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            check_entry(out.prompt_logprobs[i], prompt[i], ref[i - 1], 3, tok)


def test_sampled_tokens_have_their_true_rank(llm, hf_model):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=1.5, seed=3, max_tokens=6, ignore_eos=True, logprobs=2)
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    prompt, comp = out.prompt_token_ids, out.outputs[0]
    ref = hf_logprobs(hf_model, prompt + comp.token_ids[:-1])
    ranks = []
    for j, token in enumerate(comp.token_ids):
        entry = comp.logprobs[j]
        check_entry(entry, token, ref[len(prompt) - 1 + j], 2, tok)
        ranks.append(entry[token].rank)
    assert max(ranks) > 1, "every sample was the argmax; the test proves nothing"
    assert out.prompt_logprobs is None


def test_logprobs_zero_and_the_maximum(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=2, logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=2, logprobs=20, prompt_logprobs=20)]
    zero, most = llm.generate([PROMPTS[1], PROMPTS[1]], params, use_tqdm=False)
    for entry, token in zip(zero.outputs[0].logprobs, zero.outputs[0].token_ids):
        assert list(entry) == [token]
    for entry in most.outputs[0].logprobs:
        assert len(entry) == 20  # greedy: the chosen token is the top one
    assert all(len(e) in (20, 21) for e in most.prompt_logprobs[1:])


def test_prompt_logprobs_complete_when_the_prompt_is_cached(llm):
    prompt = ("A prompt long enough to fill a few blocks of the KV cache, so that its second "
              "run finds them in the prefix cache and would skip computing them, which it must "
              "not do when the prompt's own logprobs are asked for:")
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    second = llm.generate(prompt, params, use_tqdm=False)[0]
    n = len(first.prompt_token_ids)
    assert n > 32 and len(first.prompt_logprobs) == n
    assert len(second.prompt_logprobs) == n
    for a, b in zip(first.prompt_logprobs[1:], second.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for tid in a:
            assert a[tid].logprob == pytest.approx(b[tid].logprob, abs=ATOL)
