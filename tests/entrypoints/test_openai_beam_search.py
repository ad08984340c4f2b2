"""use_beam_search on the live server: n beams equal to LLM.beam_search's, vLLM's refusals."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from pagedllm import LLM, BeamSearchParams
from tests.entrypoints.conftest import Server

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Hello, my name is"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8
BEAM = {"use_beam_search": True, "length_penalty": 0.7}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=128 * 2**20, max_model_len=1024)


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.auth, timeout=300)


def _expected(llm: LLM, prompt: str | list[int], n: int, **kw: Any) -> list[dict[str, Any]]:
    """LLM.beam_search's best n, as the server returns them (the completion only, no EOS)."""
    tokenizer = llm.get_tokenizer()
    params = BeamSearchParams(n, MAX_TOKENS, length_penalty=0.7, **kw)
    (out,) = llm.beam_search(prompt, params)
    beams = []
    for seq in out.sequences:
        generated = seq.output_token_ids
        stopped = seq.finish_reason == "stop"
        text_ids = generated[:-1] if stopped else generated
        beams.append({"text": tokenizer.decode(text_ids), "finish_reason": seq.finish_reason,
                      "token_ids": generated if params.include_stop_str_in_output else text_ids,
                      "prompt_len": seq.num_prompt_tokens})
    return beams


def _wait_kv_free(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        free = server.metric("pagedllm:kv_cache_free_blocks")
        total = server.metric("pagedllm:kv_cache_total_blocks")
        if total > 0 and free == total and server.metric("pagedllm:num_requests_running") == 0:
            return
        assert time.monotonic() < deadline, f"KV blocks not back: {free} of {total} free"
        time.sleep(0.05)


def test_completions_return_the_best_beams(server: Server, llm: LLM) -> None:
    n = 3
    r = _post(server, "/completions", {"prompt": PROMPTS, "n": n, "max_tokens": MAX_TOKENS,
                                       "temperature": 0, "return_token_ids": True, **BEAM})
    assert r.status_code == 200, r.text
    body = r.json()
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert len(choices) == n * len(PROMPTS)
    prompt_tokens = completion_tokens = 0
    for i, prompt in enumerate(PROMPTS):
        want = _expected(llm, prompt, n)
        prompt_tokens += want[0]["prompt_len"]
        for j, w in enumerate(want):
            got = choices[i * n + j]
            assert got["text"] == w["text"]
            assert got["finish_reason"] == w["finish_reason"]
            assert got["token_ids"] == w["token_ids"]
            completion_tokens += len(w["token_ids"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    _wait_kv_free(server)


def test_openai_client_and_include_stop_str(server: Server, llm: LLM) -> None:
    client = server.client()
    out = client.completions.create(
        model="", prompt=PROMPTS[0], n=2, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={**BEAM, "include_stop_str_in_output": True, "return_token_ids": True})
    want = _expected(llm, PROMPTS[0], 2, include_stop_str_in_output=True)
    assert [c.text for c in out.choices] == [w["text"] for w in want]
    eos = llm.get_tokenizer().eos_token_id
    stopped = [w for w in want if w["finish_reason"] == "stop"]
    assert stopped and all(w["token_ids"][-1] == eos for w in stopped)
    assert [c.model_extra["token_ids"] for c in out.choices] == [w["token_ids"] for w in want]
    assert out.usage.completion_tokens == sum(len(w["token_ids"]) for w in want)


def test_completion_logprobs_come_from_the_beams(server: Server) -> None:
    r = _post(server, "/completions", {"prompt": PROMPTS[0], "n": 2, "logprobs": 5,
                                       "max_tokens": MAX_TOKENS, "temperature": 0, **BEAM})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"]
        # 5 > 2 * n: the rounds asked for more, so all are shown
        assert all(5 <= len(top) <= 6 for top in lp["top_logprobs"])


def test_chat_returns_the_best_beams_streamed_or_not(server: Server, llm: LLM) -> None:
    prompt_ids = httpx.post(server.url + "/tokenize", headers=server.auth, timeout=60,
                            json={"messages": MESSAGES}).json()["tokens"]
    want = _expected(llm, prompt_ids, 2)
    client = server.client()
    out = client.chat.completions.create(model="", messages=MESSAGES, n=2, temperature=0,
                                         max_tokens=MAX_TOKENS, extra_body=BEAM)
    assert [c.message.content for c in out.choices] == [w["text"] for w in want]
    assert [c.finish_reason for c in out.choices] == [w["finish_reason"] for w in want]
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == sum(len(w["token_ids"]) for w in want)

    texts, finish = ["", ""], [None, None]
    for chunk in client.chat.completions.create(
            model="", messages=MESSAGES, n=2, temperature=0, max_tokens=MAX_TOKENS,
            stream=True, extra_body=BEAM):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [w["text"] for w in want]
    assert finish == [w["finish_reason"] for w in want]
    _wait_kv_free(server)


@pytest.mark.parametrize("path,extra,param", [
    ("/completions", {"stream": True}, "stream"),  # vLLM refuses it too
    ("/completions", {"stop": ["."]}, "stop"),
    ("/completions", {"echo": True, "logprobs": 1}, "echo"),
    ("/completions", {"n": 11}, "n"),  # 22 logprobs a round > max_logprobs (20)
    ("/chat/completions", {"seed": 1}, "seed"),
    ("/chat/completions", {"top_p": 0.5}, "top_p"),
    ("/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/chat/completions", {"response_format": {"type": "json_object"}}, "use_beam_search"),
])
def test_fields_beam_search_cannot_honour_are_refused(server: Server, path: str,
                                                      extra: dict[str, Any], param: str) -> None:
    body = {"prompt": PROMPTS[0]} if path == "/completions" else {"messages": MESSAGES}
    r = _post(server, path, {**body, "max_tokens": 2, **BEAM, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_length_penalty_without_beam_search_is_refused(server: Server) -> None:
    r = _post(server, "/completions", {"prompt": PROMPTS[0], "max_tokens": 2,
                                       "length_penalty": 2.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "length_penalty", r.text
