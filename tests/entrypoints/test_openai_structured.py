"""Structured outputs, tool calls and reasoning through the official ``openai`` client (and
LangChain) against a real ``pagedllm serve`` of the default model. Requests of one test run
concurrently, so that they share the engine's steps."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Iterator
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.entrypoints.conftest import launch_server

if TYPE_CHECKING:
    from tests.entrypoints.conftest import Server

pytestmark = pytest.mark.slow

ASK = "Answer in JSON."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 12}}, "required": ["zone"]}}}


class Color(str, Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favorite: Color
    address: Address


class Inventory(BaseModel):
    items: list[Annotated[str, Field(max_length=10)]] = Field(min_length=1, max_length=3)
    total: float = Field(ge=0, le=1000)
    note: str | None = Field(default=None, max_length=20)


class Verdict(BaseModel):
    ok: bool
    score: int = Field(ge=1, le=5)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with launch_server("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                       "--reasoning-parser", "qwen3") as running:
        yield running


def _chat(user: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": user}]


def test_parse_returns_valid_objects(server: Server) -> None:
    client = server.async_client()

    async def parse(model: type[BaseModel], user: str) -> Any:
        return await client.chat.completions.parse(
            model="", messages=_chat(user), response_format=model, max_tokens=160,
            temperature=0)

    async def main() -> list[Any]:
        return await asyncio.gather(
            parse(Person, f"Describe a person. {ASK}"),
            parse(Inventory, f"Name three fruits a shop sells and their total price. {ASK}"),
            parse(Verdict, f"Is water wet? {ASK}"))

    for model, completion in zip((Person, Inventory, Verdict), asyncio.run(main())):
        message = completion.choices[0].message
        assert isinstance(message.parsed, model), message.content
        jsonschema.validate(json.loads(message.content), model.model_json_schema())


def test_regex_choice_grammar_and_json_streamed_or_not(server: Server) -> None:
    client = server.async_client()
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"
    grammar = 'root ::= num " " ("+" | "-") " " num\nnum ::= [1-9] [0-9]?'
    schema = Verdict.model_json_schema()
    plain = (f"Give an answer. {ASK}", "Answer: ")
    bodies = [({"guided_regex": date}, lambda t: re.fullmatch(date, t), plain),
              ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no"),
               plain),
              ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right"), plain),
              ({"guided_grammar": grammar},
               lambda t: re.fullmatch(r"[1-9][0-9]? [+-] [1-9][0-9]?", t), plain),
              ({"guided_json": schema},
               lambda t: jsonschema.validate(json.loads(t), schema) or True, plain),
              # any JSON object: a prompt (and greedy decoding) that make a short one likely
              ({"response_format": {"type": "json_object"}, "temperature": 0},
               lambda t: isinstance(json.loads(t), dict),
               ('Reply with the JSON object {"a": 1}.', '{"a": 1} is JSON; so is '))]

    async def run(body: dict[str, Any], prompts: tuple[str, str], chat: bool,
                  stream: bool) -> str:
        common = {"model": "", "max_tokens": 60, "temperature": 0.7, "seed": 1,
                  "stream": stream}
        if chat:
            made = await client.chat.completions.create(
                messages=_chat(prompts[0]), extra_body=body, **common)
            if not stream:
                return made.choices[0].message.content
            return "".join([c.choices[0].delta.content or "" async for c in made if c.choices])
        made = await client.completions.create(prompt=prompts[1], extra_body=body, **common)
        if not stream:
            return made.choices[0].text
        return "".join([c.choices[0].text async for c in made if c.choices])

    async def main() -> list[str]:
        return await asyncio.gather(*(run(body, prompts, chat, stream)
                                      for body, _, prompts in bodies
                                      for chat, stream in ((True, False), (False, True))))

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        assert bodies[i // 2][1](text), (bodies[i // 2][0], text)


def _calls_of_stream(chunks: list[Any]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.id is not None:
                calls[call.index] = [call.function.name, ""]
            calls[call.index][1] += call.function.arguments or ""
    return [(name, args) for name, args in calls.values()]


def test_tool_calls_required_and_named_are_valid(server: Server) -> None:
    client = server.async_client()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    named = {"type": "function", "function": {"name": "get_weather"}}

    async def run(choice: Any, stream: bool) -> tuple[str | None, list[tuple[str, str]]]:
        made = await client.chat.completions.create(
            model="", messages=_chat("What is the weather in Paris?"), tools=[WEATHER, TIME],
            tool_choice=choice, parallel_tool_calls=False, max_tokens=80, temperature=0.5,
            seed=2, stream=stream)
        if stream:
            chunks = [c async for c in made]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            return finish, _calls_of_stream(chunks)
        message = made.choices[0].message
        return made.choices[0].finish_reason, [(c.function.name, c.function.arguments)
                                               for c in message.tool_calls]

    async def main() -> list[Any]:
        return await asyncio.gather(run("required", False), run("required", True),
                                    run(named, False), run(named, True))

    results = asyncio.run(main())
    for i, (finish, calls) in enumerate(results):
        assert finish == ("tool_calls" if i < 2 else "stop")
        assert len(calls) == 1
        name, arguments = calls[0]
        assert i < 2 or name == "get_weather"
        jsonschema.validate(json.loads(arguments), schemas[name])


def test_auto_tool_choice_parses_hermes_calls_and_reasoning(server: Server) -> None:
    # The small model does not call tools on its own: a regex makes it write a Hermes call
    # after some thinking, and the parsers must find both, streamed or not.
    client = server.async_client()
    regex = (r'<think>[a-z ]{3,20}</think>\n<tool_call>\n\{"name": "get_weather", '
             r'"arguments": \{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\}\}\n</tool_call>')

    async def run(stream: bool) -> Any:
        made = await client.chat.completions.create(
            model="", messages=_chat("Weather in Paris?"), tools=[WEATHER], max_tokens=80,
            temperature=0, stream=stream, extra_body={"guided_regex": regex})
        if not stream:
            m = made.choices[0].message
            return (made.choices[0].finish_reason, m.reasoning_content,
                    [(c.function.name, c.function.arguments) for c in m.tool_calls], m.content)
        chunks = [c async for c in made]
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                            for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return finish, reasoning, _calls_of_stream(chunks), content or None

    async def main() -> list[Any]:
        return await asyncio.gather(run(False), run(True))

    whole, streamed = asyncio.run(main())
    assert whole == streamed
    finish, reasoning, calls, content = whole
    assert finish == "tool_calls" and re.fullmatch("[a-z ]{3,20}", reasoning)
    assert content is None and calls[0][0] == "get_weather"
    assert json.loads(calls[0][1])["unit"] == "celsius"


def test_with_structured_output_of_langchain(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=server.base_url, api_key=server.api_key,
                                      model="", temperature=0, max_tokens=120, max_retries=0)
    # json_mode constrains to any object: the prompt shows the one Verdict parses
    prompt = 'Is water wet? Reply with a JSON object like {"ok": true, "score": 3}.'

    async def main() -> list[Any]:
        return await asyncio.gather(*(llm.with_structured_output(Verdict, method=m).ainvoke(
            prompt) for m in ("json_schema", "function_calling", "json_mode")))

    for result in asyncio.run(main()):
        assert isinstance(result, Verdict)


def test_bad_requests_name_their_field(server: Server) -> None:
    messages = _chat("Hi")
    cases = [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"guided_grammar": "root ::= nothing"}, "guided_grammar"),
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_decoding_backend": "outlines", "guided_regex": "a"},
         "guided_decoding_backend"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "objec"}}}], "tool_choice": "required"},
         "tools"),
        ({"allowed_token_ids": [10**9]}, None),
        ({"logits_processors": ["x"]}, "logits_processors"),
        ({"length_penalty": 2.0}, "length_penalty"),
    ]
    for body, param in cases:
        r = httpx.post(server.base_url + "/chat/completions", headers=server.auth, timeout=60,
                       json={"messages": messages, "max_tokens": 4, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)


def test_auto_tool_choice_needs_the_flags() -> None:
    from pagedllm.entrypoints.openai.errors import APIError
    from pagedllm.entrypoints.openai.protocol_chat import ChatCompletionRequest
    from pagedllm.entrypoints.openai.serving_chat import ChatOptions
    from pagedllm.entrypoints.openai.tool_calls import ToolChoice

    request = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    with pytest.raises(APIError, match="--enable-auto-tool-choice"):
        ToolChoice.of(request, auto_enabled=False)
    assert ToolChoice.of(request, auto_enabled=True).mode == "auto"
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ChatOptions(enable_auto_tool_choice=True)


def test_chat_template_kwargs_reach_the_template(default_tokenizer) -> None:
    from pagedllm.entrypoints.chat_utils import render_chat

    tokenizer = copy.copy(default_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}"
                               "<think></think>{% endif %}{{ tools | length }}")
    text, _, _ = render_chat(tokenizer, _chat("Hi"), False, True, False, [WEATHER, TIME],
                             {"enable_thinking": False})
    assert text == "Hi<think></think>2"
