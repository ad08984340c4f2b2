"""The OpenAI-compatible server, through the official ``openai`` client, on the default model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.entrypoints.conftest import Server

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_health_version(server: Server, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].model_extra["max_model_len"] == server.max_model_len
    assert httpx.get(server.url + "/health").status_code == 200  # open without the key
    assert httpx.get(server.url + "/version").json()["version"]
    assert "pagedllm:num_requests_running" in httpx.get(server.url + "/metrics").text


def _tokenize(server: Server, **body: object) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body,
                   headers=server.auth)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == len(r.json()["tokens"])
    return r.json()["tokens"]


def test_completion_stream_equals_non_stream(server: Server, client: openai.OpenAI,
                                             model: str) -> None:
    args = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12 == len(choice.logprobs.tokens)
    assert full.usage.prompt_tokens == len(_tokenize(server, prompt=PROMPT))
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)

    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == choice.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert sum(len(c.choices[0].logprobs.tokens) for c in text_chunks) == 12
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_stream_equals_non_stream(server: Server, client: openai.OpenAI,
                                       model: str) -> None:
    args = dict(model=model, messages=MESSAGES, max_completion_tokens=16, temperature=0)
    full = client.chat.completions.create(**args, logprobs=True, top_logprobs=3)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert full.usage.prompt_tokens == len(_tokenize(server, messages=MESSAGES))

    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == message.content
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage

    parts = [{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}]
    as_parts = client.chat.completions.create(model=model, messages=parts,
                                              max_completion_tokens=16, temperature=0)
    assert as_parts.choices[0].message.content == message.content


def test_n_samples(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt=PROMPT, n=3, max_tokens=8,
                                     temperature=1.0, seed=7, logprobs=0,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert full.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in full.choices) == 24

    finals: dict[int, int] = {}
    texts: dict[int, str] = {}
    stream = client.chat.completions.create(model=model, messages=MESSAGES, n=2, max_tokens=8,
                                            temperature=1.0, stream=True)
    for chunk in stream:
        for c in chunk.choices:
            assert c.index not in finals, "a chunk after the choice's finish_reason"
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finals[c.index] = 1
    assert sorted(finals) == [0, 1] and all(texts.values())


def test_stop_strings(client: openai.OpenAI, model: str) -> None:
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    cut = base[:base.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      stop=[stop], stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
            assert r.choices[0].model_extra["stop_reason"] == stop
        assert (text, finish) == (cut, "stop")
    kept = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                     stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop


def test_prompt_forms_and_echo(server: Server, client: openai.OpenAI, model: str) -> None:
    ids = _tokenize(server, prompt=PROMPT)
    args = dict(model=model, max_tokens=6, temperature=0)
    by_text = client.completions.create(prompt=PROMPT, **args).choices[0].text
    assert client.completions.create(prompt=ids, **args).choices[0].text == by_text

    both = client.completions.create(prompt=[PROMPT, "1, 2, 3,"], n=2, **args)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == by_text  # greedy: samples agree
    lists = client.completions.create(prompt=[ids, ids], **args)
    assert [c.text for c in lists.choices] == [by_text, by_text]
    assert lists.usage.prompt_tokens == 2 * len(ids)

    echo = client.completions.create(prompt=PROMPT, echo=True, logprobs=1, **args).choices[0]
    assert echo.text == PROMPT + by_text
    assert len(echo.logprobs.tokens) == len(ids) + 6
    assert echo.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    streamed = client.completions.create(prompt=PROMPT, echo=True, stream=True, **args)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + by_text


def test_sampling_extras_are_accepted(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, temperature=0.8, top_p=0.9, seed=1,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"11": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 5,
                    "stop_token_ids": [2], "skip_special_tokens": False})
    assert r.usage.completion_tokens == 5
    again = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, temperature=0.8, top_p=0.9, seed=1,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"11": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 5,
                    "stop_token_ids": [2], "skip_special_tokens": False})
    assert again.choices[0].text == r.choices[0].text  # seeded


def test_tokenize_detokenize(server: Server) -> None:
    ids = _tokenize(server, prompt=PROMPT)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids},
                   headers=server.auth)
    assert r.status_code == 200 and r.json()["prompt"] == PROMPT
