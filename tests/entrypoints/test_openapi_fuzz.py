"""The server's OpenAPI schema, fuzzed: no request, however malformed, gets a 5xx.

A live ``pagedllm serve`` (the default model, ``max_model_len`` 96, 4 sequences) answers every
operation of its own ``/openapi.json`` with cases from schemathesis: valid and invalid bodies of
the raw schema (whose fields have no ranges, so most are refused: that is the point), then bodies
of a narrowed copy whose values are in range, so sampling, logprobs, beam search, streaming and
structured outputs run too. Every answer is below 500, JSON (SSE for streams, text for
/metrics), errors in OpenAI's shape; the server log has no traceback; /health is 200 after.

Hypothesis is derandomized (the same cases on every run) and each pass has a fixed number of
examples (~325 requests, ~40 s on two quiet cores): a fixed amount, so that every pass runs on a
slow or busy machine too (a wall-clock budget once skipped the last pass under load).
The hand-written hostile bodies and the regression cases below are what the fuzzer (and its
first manual run) found: each failed the server before the fix in ``protocol.py``.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.entrypoints.conftest import Server, launch_server

schemathesis = pytest.importorskip("schemathesis")  # in the test extras
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 96  # every accepted request ends within a few dozen decode steps
MAX_NUM_SEQS = 4
RAW_EXAMPLES = 30  # per operation and generation mode, on the server's own schema
NARROW_EXAMPLES = 40  # per generating operation, on the narrowed schema
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Small limits: fuzzed max_tokens beyond 96 are refused, the rest finish quickly."""
    with launch_server("--kv-cache-memory-bytes", str(64 * 2**20), "--disable-log-stats",
                       max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS) as running:
        yield running


def _assert_healthy(server: Server) -> None:
    assert server.process.poll() is None, server.log_tail()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200, server.log_tail()
    log = server.log_tail(10**6)
    assert "Traceback" not in log and "Request failed" not in log, log[-5000:]


# --- checking one answer ---

def _check_answer(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """Below 500; errors in OpenAI's shape (never FastAPI's 422); bodies as their type says."""
    where = f"{method} {path} -> {status}: {body[:500]!r}"
    assert status < 500, where
    assert status != 422, where
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == ERROR_KEYS and error["type"] != "server_error", where
    elif content_type.startswith("text/event-stream"):
        _check_sse(body.decode(), where)
    elif content_type.startswith("application/json"):
        json.loads(body)
    else:  # the two answers that are not JSON: Prometheus text, an empty 200
        assert (method, path) in {("GET", "/metrics"), ("GET", "/health")}, where


def _check_sse(text: str, where: str) -> None:
    events = [e for e in text.split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", f"{where}\n...{text[-1500:]}"
    events = events[:-1]
    assert events, where
    for event in events:
        assert event.startswith("data: "), where
        chunk = json.loads(event[len("data: "):])
        assert "error" not in chunk or chunk["error"]["type"] != "server_error", where


# --- the narrowed schema: values in range, so that requests get past validation ---

_TEXT = {"type": "string", "maxLength": 24}
_TOKEN = {"type": "integer", "minimum": 0, "maximum": 1000}
_BOOL = {"type": "boolean"}


def _ints(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _floats(lo: float, hi: float) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _sampling(model: str) -> dict[str, Any]:
    return {
        "model": {"enum": [model]}, "n": _ints(1, 3), "temperature": _floats(0, 2),
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": _ints(-1, 50), "min_p": _floats(0, 1), "presence_penalty": _floats(-2, 2),
        "frequency_penalty": _floats(-2, 2), "repetition_penalty": _floats(0.5, 2),
        "seed": _ints(0, 2**32), "min_tokens": _ints(0, 4),
        "stop": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": 3}]},
        "stop_token_ids": {"type": "array", "items": _TOKEN, "maxItems": 3},
        "allowed_token_ids": {"type": "array", "items": _TOKEN, "minItems": 1, "maxItems": 5},
        "bad_words": {"type": "array", "items": _TEXT, "maxItems": 2},
        "logit_bias": {"type": "object", "maxProperties": 3,
                       "propertyNames": {"pattern": "^[0-9]{1,3}$"},
                       "additionalProperties": _floats(-100, 100)},
        "include_stop_str_in_output": _BOOL, "ignore_eos": _BOOL, "skip_special_tokens": _BOOL,
        "stream": _BOOL, "use_beam_search": _BOOL, "return_token_ids": _BOOL,
        "stream_options": {"type": "object", "additionalProperties": False,
                           "properties": {"include_usage": _BOOL,
                                          "continuous_usage_stats": _BOOL}},
        "truncate_prompt_tokens": _ints(1, 32),
        "guided_choice": {"type": "array", "minItems": 1, "maxItems": 3,
                          "items": {"type": "string", "minLength": 1, "maxLength": 8}},
        "response_format": {"type": "object", "required": ["type"], "additionalProperties": False,
                            "properties": {"type": {"enum": ["text", "json_object"]}}},
    }


def _narrowed_bodies(model: str) -> dict[str, dict[str, Any]]:
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"enum": ["system", "user", "assistant"]},
                              "content": _TEXT}}
    completion = {**_sampling(model), "max_tokens": _ints(1, 8), "logprobs": _ints(0, 5),
                  "prompt_logprobs": _ints(0, 3), "echo": _BOOL,
                  "prompt": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 40},
                                       {"type": "array", "items": _TEXT, "minItems": 1,
                                        "maxItems": 3},
                                       {"type": "array", "items": _TOKEN, "minItems": 1,
                                        "maxItems": 8}]}}
    chat = {**_sampling(model), "max_tokens": _ints(1, 8), "logprobs": _BOOL,
            "top_logprobs": _ints(0, 5), "add_generation_prompt": _BOOL,
            "continue_final_message": _BOOL, "echo": _BOOL,
            "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": 3}}
    return {
        "/v1/completions": {"type": "object", "properties": completion,
                            "required": ["prompt"], "additionalProperties": False},
        "/v1/chat/completions": {"type": "object", "properties": chat,
                                 "required": ["messages", "max_tokens"],
                                 "additionalProperties": False},
    }


def _narrowed(raw: dict[str, Any], model: str) -> dict[str, Any]:
    """``raw`` with only the generating operations, their bodies the schemas above."""
    schema = copy.deepcopy(raw)
    bodies = _narrowed_bodies(model)
    schema["paths"] = {path: ops for path, ops in schema["paths"].items() if path in bodies}
    for path, body in bodies.items():
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        content["application/json"]["schema"] = body
    return schema


# --- the fuzzer ---

def _fuzz(server: Server, schema: Any, mode: GenerationMode, examples: int,
          tally: Counter[tuple[str, int]]) -> None:
    """Every operation of ``schema``: ``examples`` derandomized cases each (one for an operation
    without parameters or a body, which has nothing to vary)."""
    for result in schema.get_all_operations():
        op = result.ok()
        if mode is GenerationMode.NEGATIVE and not op.body:
            continue  # nothing to make invalid
        n = examples if op.body else 1
        run = _one_operation(server, op, mode, tally)
        settings(max_examples=n, derandomize=True, database=None, deadline=None,
                 phases=[Phase.explicit, Phase.generate, Phase.shrink],
                 suppress_health_check=list(HealthCheck))(
            given(case=op.as_strategy(generation_mode=mode))(run))()


def _one_operation(server: Server, op: Any, mode: GenerationMode,
                   tally: Counter[tuple[str, int]]) -> Callable[[Any], None]:
    def run(case: Any) -> None:
        response = case.call(base_url=server.url, headers=server.auth, timeout=120)
        tally[(f"{op.label} ({mode.value})", response.status_code)] += 1
        content_type = response.headers.get("content-type", [""])[0]  # schemathesis: lists
        try:
            _check_answer(op.method.upper(), op.path, response.status_code, content_type,
                          response.content)
        except AssertionError as e:
            raise AssertionError(f"{e}\nrequest body: {case.body!r}") from None
    return run


def test_fuzzed_openapi_requests_get_no_5xx(server: Server) -> None:
    start = time.monotonic()
    raw = httpx.get(server.url + "/openapi.json", timeout=30).json()
    model = httpx.get(server.base_url + "/models", headers=server.auth,
                      timeout=30).json()["data"][0]["id"]
    tally: Counter[tuple[str, int]] = Counter()
    loaded = schemathesis.openapi.from_dict(raw)
    _fuzz(server, loaded, GenerationMode.POSITIVE, RAW_EXAMPLES, tally)
    _fuzz(server, loaded, GenerationMode.NEGATIVE, RAW_EXAMPLES, tally)
    _fuzz(server, schemathesis.openapi.from_dict(_narrowed(raw, model)),
          GenerationMode.POSITIVE, NARROW_EXAMPLES, tally)
    total = sum(tally.values())
    print(f"\nfuzzed {total} requests in {time.monotonic() - start:.1f} s")
    for (label, status), count in sorted(tally.items()):
        print(f"  {label}: {status} x{count}")
    operations = {label.split(" (")[0] for label, _ in tally}
    assert len(operations) == len(raw["paths"]), operations  # every path was sent something
    # the narrowed pass reached the engine: some generations were accepted
    assert tally[("POST /v1/completions (positive)", 200)] > 0
    assert tally[("POST /v1/chat/completions (positive)", 200)] > 0
    _assert_healthy(server)


# --- hand-made hostile bodies: always a 400, never a 5xx ---

POST_PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
DEEP_OBJECT = b'{"prompt": "Hi", "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
BIG = "1" + "0" * 400  # past msgpack's 64 bits
HOSTILE_RAW = {
    "truncated JSON": b'{"prompt": "Hi",',
    "not UTF-8": b"\xff\xfe\x00",
    "empty body": b"",
    "top-level array": b"[]",
    "top-level string": b'"Hi"',
    "top-level number": b"1",
    "top-level null": b"null",
    "deeply nested arrays": DEEP,
    "deeply nested objects": DEEP_OBJECT,
    "an integer of 5000 digits": b'{"prompt": "Hi", "tokens": [1' + b"0" * 5000 + b"]}",
}


def _post_raw(server: Server, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=raw, timeout=300,
                      headers={**server.auth, "Content-Type": "application/json"})


def _assert_400(r: httpx.Response, *words: str) -> None:
    _check_answer("POST", str(r.request.url.path), r.status_code,
                  r.headers.get("content-type", ""), r.content)
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("name", list(HOSTILE_RAW))
def test_hostile_body_is_a_400(server: Server, path: str, name: str) -> None:
    _assert_400(_post_raw(server, path, HOSTILE_RAW[name]))


HI = '{"prompt": "Hi", "max_tokens": 2, '
CHAT = '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '


@pytest.mark.parametrize("path,raw,words", [
    # NaN and infinities (Python's JSON reads them)
    ("/v1/completions", HI + '"temperature": NaN}', ["temperature"]),
    ("/v1/completions", HI + '"top_p": NaN}', ["top_p"]),
    ("/v1/completions", HI + '"top_k": NaN}', ["top_k"]),
    ("/v1/completions", HI + '"frequency_penalty": -Infinity}', ["frequency_penalty"]),
    ("/v1/completions", HI + '"logit_bias": {"1": NaN}}', ["logit_bias"]),
    ("/v1/chat/completions", CHAT + '"temperature": NaN}', ["temperature"]),
    ("/detokenize", '{"tokens": [NaN]}', ["tokens"]),
    # integers past 64 bits in every field that reaches the engine core: before the fix,
    # stop_token_ids and top_k failed the core's encode and the server stopped
    *[("/v1/completions", HI + f'"{field}": {BIG}}}', [field])
      for field in ("n", "top_k", "min_tokens", "logprobs", "truncate_prompt_tokens",
                    "prompt_logprobs", "best_of", "priority", "seed")],
    *[("/v1/completions", HI + f'"{field}": [{BIG}]}}', [field])
      for field in ("stop_token_ids", "allowed_token_ids")],
    ("/v1/completions", '{"prompt": [' + BIG + "]}", ["prompt"]),
    ("/v1/completions", '{"prompt": "Hi", "max_tokens": ' + BIG + "}", ["max_tokens"]),
    ("/v1/completions", HI + '"logit_bias": {"' + BIG + '": 1}}', ["logit_bias"]),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], '
     '"max_completion_tokens": ' + BIG + "}", ["max_completion_tokens"]),
    ("/v1/chat/completions", CHAT + '"logprobs": true, "top_logprobs": ' + BIG + "}",
     ["top_logprobs"]),
    ("/detokenize", '{"tokens": [' + BIG + "]}", ["tokens"]),
    # lone surrogates: JSON's \\ud800 is no Unicode; before the fix, one in a stop string,
    # bad word or grammar failed the core's encode and the server stopped
    ("/v1/completions", HI.replace('"Hi"', '"a\\ud800b"') + '"n": 1}', ["lone surrogate"]),
    *[("/v1/completions", HI + f'"{field}": ["\\udfff"]}}', [field, "lone surrogate"])
      for field in ("stop", "bad_words", "guided_choice")],
    *[("/v1/completions", HI + f'"{field}": "\\ud800"}}', [field, "lone surrogate"])
      for field in ("stop", "guided_regex", "guided_grammar", "guided_json", "suffix")],
    ("/v1/completions", HI + '"structured_outputs": {"regex": "\\ud800"}}',
     ["structured_outputs", "lone surrogate"]),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     ["lone surrogate"]),
    ("/v1/chat/completions", CHAT + '"tools": [{"type": "function", "function": '
     '{"name": "\\ud800"}}]}', ["tools", "lone surrogate"]),
    ("/tokenize", '{"prompt": "\\ud800"}', ["lone surrogate"]),
    ("/tokenize", '{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
     ["lone surrogate"]),
])
def test_hostile_value_is_a_400(server: Server, path: str, raw: str, words: list[str]) -> None:
    _assert_400(_post_raw(server, path, raw.encode()), *words)
    _assert_healthy(server)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bias", ["1e308", "-1e308", "Infinity"])
def test_huge_logit_bias_is_clamped_as_vllm_does(server: Server, bias: str, stream: bool) -> None:
    """A bias of 1e308 overflowed float32 in the engine step: a 500 before the fix. vLLM clamps
    biases to [-100, 100] (OpenAI's documented range); so does pagedllm."""
    raw = HI + f'"logit_bias": {{"1": {bias}}}, "stream": {json.dumps(stream)}}}'
    r = _post_raw(server, "/v1/completions", raw.encode())
    _check_answer("POST", "/v1/completions", r.status_code, r.headers["content-type"], r.content)
    assert r.status_code == 200, r.text
    _assert_healthy(server)


def test_5mb_prompt_to_tokenize(server: Server) -> None:
    """No length limit on /tokenize (vLLM has none either): counted, not a 5xx."""
    prompt = "hello " * (5 * 2**20 // 6)
    r = httpx.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=300)
    _check_answer("POST", "/tokenize", r.status_code, r.headers["content-type"], r.content)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 800_000
    assert body["max_model_len"] == MAX_MODEL_LEN
    _assert_healthy(server)
