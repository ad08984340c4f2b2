"""Bad requests get OpenAI-shaped errors with the right status, and the server keeps serving."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.entrypoints.conftest import Server

pytestmark = pytest.mark.slow

LONG_PROMPT = "hello " * 1500  # > max_model_len (1024) tokens


def _post(server: Server, path: str, body: Any, headers: dict[str, str] | None = None,
          raw: bytes | None = None) -> httpx.Response:
    headers = server.auth if headers is None else headers
    if raw is not None:
        return httpx.post(server.url + path, content=raw, timeout=300,
                          headers={**headers, "Content-Type": "application/json"})
    # ASCII JSON: \\u escapes carry what UTF-8 cannot (a lone surrogate)
    return httpx.post(server.url + path, content=json.dumps(body), timeout=300,
                      headers={**headers, "Content-Type": "application/json"})


def _assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]


def _assert_still_serving(server: Server) -> None:
    r = _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path,body,status,words", [
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, ["temperature"]),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, ["top_p"]),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, ["n must"]),
    # n is bounded by max_num_seqs (64 here): n=1000 ran for minutes.
    ("/v1/completions", {"prompt": "Hi", "n": 1000}, 400, ["n must", "64"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 65}, 400,
     ["n must", "64"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, ["max_tokens"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "many"}, 400, ["max_tokens"]),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, ["logprobs", "20"]),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, ["1024", "input tokens"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 5000}, 400, ["1024", "5000"]),
    ("/v1/completions", {"prompt": ""}, 400, ["empty"]),
    ("/v1/completions", {"prompt": "a\ud800b"}, 400, ["lone surrogate"]),
    ("/tokenize", {"prompt": "a\ud800b"}, 400, ["lone surrogate"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}, 400,
     ["lone surrogate"]),
    # One seed out of torch's range failed every request of its step (it is refused here).
    ("/v1/completions", {"prompt": "Hi", "seed": 2**70}, 400, ["seed"]),
    ("/v1/completions", {"prompt": "Hi", "seed": -1}, 400, ["seed"]),
    ("/v1/completions", {"prompt": []}, 400, []),
    ("/v1/completions", {"prompt": [10**9]}, 400, ["vocabulary"]),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"999999999": 1}}, 400, ["logit_bias"]),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
     ["stream"]),
    ("/v1/completions", {"max_tokens": 2}, 400, ["prompt"]),
    ("/v1/completions", {"prompt": "Hi", "model": "no-such-model"}, 404, ["no-such-model"]),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 2}, 400, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "top_logprobs": 2}, 400, ["logprobs"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     ["1024"]),
    ("/v1/chat/completions", {"messages": "Hi"}, 400, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "model": "gpt-4"}, 404, ["gpt-4"]),
])
def test_bad_request(server: Server, path: str, body: dict[str, Any], status: int,
                     words: list[str]) -> None:
    _assert_error(_post(server, path, body), status, *words)
    if "stream_options" not in body:  # streamed: refused before the event stream starts
        _assert_error(_post(server, path, {**body, "stream": True}), status, *words)
    _assert_still_serving(server)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"null", b'"text"'])
def test_malformed_json_is_400(server: Server, raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        _assert_error(_post(server, path, None, raw=raw), 400)
    _assert_still_serving(server)


def test_api_key_required(server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 2}
    _assert_error(_post(server, "/v1/completions", body, headers={}), 401)
    _assert_error(_post(server, "/v1/completions", body,
                        headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    # As in vLLM, only the /v1 API needs the key.
    for path in ("/metrics", "/version", "/docs", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert _post(server, "/tokenize", {"prompt": "Hi"}, headers={}).status_code == 200
    _assert_still_serving(server)


def test_official_client_raises_typed_errors(server: Server) -> None:
    import openai

    client = server.client()
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="Hi", temperature=-2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user",
                                                                   "content": "Hi"}])
    bad_key = openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model=model, prompt="Hi", max_tokens=2)
    _assert_still_serving(server)
