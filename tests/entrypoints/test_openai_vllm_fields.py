"""vLLM's request fields and response extras, as vLLM's server takes and returns them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.entrypoints.conftest import Server

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colors."}]


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.auth, timeout=300)


def _ok(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = _post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def _tokens(server: Server, **body: Any) -> list[int]:
    return _ok(server, "/tokenize", body)["tokens"]


def _assert_prompt_logprobs(entries: list[Any], prompt_ids: list[int], k: int) -> None:
    assert len(entries) == len(prompt_ids)
    assert entries[0] is None  # the first token has no context
    for token_id, position in zip(prompt_ids[1:], entries[1:], strict=True):
        assert str(token_id) in position  # the prompt's own token, whatever its rank
        assert len(position) <= k + 1
        for lp in position.values():
            assert lp["logprob"] <= 0.0 and lp["rank"] >= 1 and isinstance(
                lp["decoded_token"], str)


def test_prompt_logprobs_are_returned(server: Server) -> None:
    out = _ok(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2,
                                          "prompt_logprobs": 2})
    _assert_prompt_logprobs(out["choices"][0]["prompt_logprobs"],
                            _tokens(server, prompt=PROMPT), 2)
    plain = _ok(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert plain["choices"][0]["prompt_logprobs"] is None

    chat = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                "prompt_logprobs": 1})
    _assert_prompt_logprobs(chat["prompt_logprobs"], _tokens(server, messages=MESSAGES), 1)

    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        r = _post(server, path, {**body, "prompt_logprobs": 1, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
