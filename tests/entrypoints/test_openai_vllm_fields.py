"""vLLM's request fields and response extras, as vLLM's server takes and returns them."""

from __future__ import annotations

import re
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


def test_tokenize_token_strs_and_tokenizer_info(server: Server) -> None:
    plain = _ok(server, "/tokenize", {"prompt": PROMPT})
    assert plain["token_strs"] is None
    body = _ok(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    assert body["tokens"] == plain["tokens"] and len(body["token_strs"]) == body["count"]
    assert "".join(body["token_strs"]).replace("Ġ", " ") == PROMPT  # byte-level BPE's space
    info = httpx.get(server.url + "/tokenizer_info", headers=server.auth)
    assert info.status_code == 404 and "tokenizer_info" in info.json()["error"]["message"]


def test_a_long_tokenize_does_not_stall_the_server(server: Server) -> None:
    import threading
    import time

    prompt = "hello world, this is text. " * (5_000_000 // 27)  # 5 MB
    done: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: done.append(
        _post(server, "/tokenize", {"prompt": prompt})))
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=60).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.05)
    worker.join()
    assert done[0].status_code == 200 and done[0].json()["count"] > 10**6
    assert slowest < 1.0, f"/health took {slowest:.1f} s during a 5 MB /tokenize"


@pytest.mark.parametrize("field,value", [
    ("priority", 1), ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", 5000),
])
def test_unimplemented_fields_are_refused_by_name(server: Server, field: str,
                                                  value: Any) -> None:
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        r = _post(server, path, {**body, "max_tokens": 2, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_return_tokens_as_token_ids(server: Server) -> None:
    """vLLM's field: the logprobs' tokens (chosen and top, echoed prompt too) read
    ``token_id:<id>``, the same ids ``return_token_ids`` gives."""
    args = {"max_tokens": 4, "temperature": 0, "return_token_ids": True,
            "return_tokens_as_token_ids": True}
    done = _ok(server, "/v1/completions", {"prompt": PROMPT, "logprobs": 2, "echo": True,
                                           **args})
    choice = done["choices"][0]
    ids = done["choices"][0]["prompt_token_ids"] + choice["token_ids"]
    assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in ids]
    assert all(re.fullmatch(r"token_id:\d+", t) for top in choice["logprobs"]["top_logprobs"]
               if top for t in top)
    chat = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True,
                                                "top_logprobs": 2, **args})["choices"][0]
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{i}" for i in chat["token_ids"]]
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert all(re.fullmatch(r"token_id:\d+", t["token"]) for c in content
               for t in c["top_logprobs"])


def test_truncate_prompt_tokens_keeps_the_last_tokens(server: Server) -> None:
    ids = _tokens(server, prompt=PROMPT)
    args = {"max_tokens": 4, "temperature": 0, "return_token_ids": True}
    cut = _ok(server, "/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 3,
                                          "echo": True, **args})
    tail = _ok(server, "/v1/completions", {"prompt": ids[-3:], **args})
    choice = cut["choices"][0]
    assert cut["usage"]["prompt_tokens"] == 3 and choice["prompt_token_ids"] == ids[-3:]
    assert choice["token_ids"] == tail["choices"][0]["token_ids"]
    assert choice["text"].endswith(tail["choices"][0]["text"])
    assert not choice["text"].startswith(PROMPT)  # the echo is the kept part only

    chat_ids = _tokens(server, messages=MESSAGES)
    chat = _ok(server, "/v1/chat/completions", {"messages": MESSAGES,
                                                "truncate_prompt_tokens": 5, **args})
    assert chat["usage"]["prompt_tokens"] == 5 and chat["prompt_token_ids"] == chat_ids[-5:]


def test_return_token_ids(server: Server) -> None:
    ids = _tokens(server, prompt=PROMPT)
    args = {"max_tokens": 5, "temperature": 0, "return_token_ids": True}
    full = _ok(server, "/v1/completions", {"prompt": PROMPT, **args})
    choice = full["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 5
    detok = _ok(server, "/detokenize", {"tokens": choice["token_ids"]})
    assert detok["prompt"] == choice["text"]

    with httpx.stream("POST", server.url + "/v1/completions", headers=server.auth,
                      json={"prompt": PROMPT, "stream": True, **args}, timeout=300) as r:
        chunks = [_event(line) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == ids
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == choice["token_ids"]

    chat_ids = _tokens(server, messages=MESSAGES)
    chat = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, **args})
    assert chat["prompt_token_ids"] == chat_ids and len(chat["choices"][0]["token_ids"]) == 5
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.auth,
                      json={"messages": MESSAGES, "stream": True, **args}, timeout=300) as r:
        chunks = [_event(line) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert chunks[0]["prompt_token_ids"] == chat_ids
    streamed = sum((c["choices"][0]["token_ids"] or [] for c in chunks), [])
    assert streamed == chat["choices"][0]["token_ids"]
    plain = _ok(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert plain["choices"][0]["token_ids"] is None


def _event(line: str) -> dict[str, Any]:
    import json

    assert line.startswith("data: ")
    return json.loads(line[len("data: "):])


def test_chat_echo_and_continue_final_message(server: Server) -> None:
    prefix = "The three colors are red,"
    conversation = [*MESSAGES, {"role": "assistant", "content": prefix}]
    args = {"max_tokens": 6, "temperature": 0, "add_generation_prompt": False}
    cont = _ok(server, "/v1/chat/completions", {"messages": conversation,
                                                "continue_final_message": True, **args})
    rendered = _tokens(server, messages=conversation, add_generation_prompt=False,
                       continue_final_message=True)
    assert cont["usage"]["prompt_tokens"] == len(rendered)
    text = _ok(server, "/detokenize", {"tokens": rendered})["prompt"]
    assert text.endswith(prefix)  # open-ended: no end-of-turn after the prefix
    new_turn = _tokens(server, messages=conversation, add_generation_prompt=False)
    assert len(new_turn) > len(rendered)

    echoed = _ok(server, "/v1/chat/completions", {
        "messages": conversation, "continue_final_message": True, "echo": True, **args})
    content = cont["choices"][0]["message"]["content"]
    assert echoed["choices"][0]["message"]["content"] == prefix + content
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.auth,
                      json={"messages": conversation, "continue_final_message": True,
                            "echo": True, "stream": True, **args}, timeout=300) as r:
        chunks = [_event(line) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) \
        == prefix + content
    # The last message is the user's: nothing to echo for the assistant's answer.
    user_last = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "echo": True,
                                                     "max_tokens": 6, "temperature": 0})
    assert not user_last["choices"][0]["message"]["content"].startswith(MESSAGES[0]["content"])

    both = _post(server, "/v1/chat/completions", {"messages": conversation,
                                                  "continue_final_message": True})
    assert both.status_code == 400 and "continue_final_message" in both.json()["error"]["message"]


def test_a_stop_token_as_the_last_allowed_token_is_a_stop(server: Server) -> None:
    args = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    greedy = _ok(server, "/v1/completions", args)["choices"][0]["token_ids"]
    last = greedy[-1]
    assert last not in greedy[:-1]
    choice = _ok(server, "/v1/completions", {**args, "stop_token_ids": [last]})["choices"][0]
    assert choice["token_ids"] == greedy
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", last)
