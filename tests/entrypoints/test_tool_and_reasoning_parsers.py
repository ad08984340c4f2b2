"""Tool-call and reasoning parsers, whole and streamed (no model): streaming any text token by
token gives the same message as parsing it whole, and never shows as content what turns out
to be a tool call or reasoning."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.chat_utils import tool_turns_as_text
from pagedllm.entrypoints.openai.chat_output import ChoiceOutput
from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.tool_calls import NamedCallParser, RequiredCallsParser
from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser

WEATHER = {"city": "Paris", "unit": "c"}


def _stream(output: ChoiceOutput, text: str, step: int = 3) -> dict:
    """Feeds ``text`` in pieces; returns the message the deltas add up to."""
    content, reasoning, calls = "", "", {}
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    for i, piece in enumerate(pieces):
        for delta in output.deltas(piece, final=i == len(pieces) - 1):
            content += delta.content or ""
            reasoning += delta.reasoning_content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": None, "arguments": "", "id": None})
                if call.id is not None:  # id and name come first, once
                    assert entry["id"] is None and entry["arguments"] == ""
                    entry["id"], entry["name"] = call.id, call.function.name
                entry["arguments"] += call.function.arguments or ""
    return {"content": content, "reasoning": reasoning,
            "calls": [(c["name"], json.loads(c["arguments"])) for c in calls.values()]}


def _whole(output: ChoiceOutput, text: str) -> dict:
    m = output.message(text)
    return {"content": m.content or "", "reasoning": m.reasoning_content or "",
            "calls": [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls]}


HERMES_TEXT = ("Let me check.\n<tool_call>\n"
               + json.dumps({"name": "weather", "arguments": WEATHER})
               + "\n</tool_call>\n<tool_call>\n" + json.dumps({"name": "time", "arguments": {}})
               + "\n</tool_call>")
LLAMA_TEXT = ("<|python_tag|>" + json.dumps({"name": "weather", "parameters": WEATHER}) + "; "
              + json.dumps({"name": "time", "parameters": {}}))


@pytest.mark.parametrize(("parser", "text", "expected"), [
    ("hermes", HERMES_TEXT, {"content": "Let me check.\n", "reasoning": "",
                             "calls": [("weather", WEATHER), ("time", {})]}),
    ("hermes", "No tools <tool here", {"content": "No tools <tool here", "reasoning": "",
                                       "calls": []}),
    ("llama3_json", LLAMA_TEXT, {"content": "", "reasoning": "",
                                 "calls": [("weather", WEATHER), ("time", {})]}),
    ("llama3_json", "Paris is sunny.", {"content": "Paris is sunny.", "reasoning": "",
                                        "calls": []}),
])
def test_auto_tool_parsers(parser, text, expected):
    assert _whole(ChoiceOutput(None, get_tool_parser(parser)), text) == expected
    for step in (1, 4, 1000):
        assert _stream(ChoiceOutput(None, get_tool_parser(parser)), text, step) == expected
    made = ChoiceOutput(None, get_tool_parser(parser))
    made.message(text)
    assert made.finish_reason("stop") == ("tool_calls" if expected["calls"] else "stop")


def test_required_and_named_outputs():
    text = json.dumps([{"name": "weather", "parameters": WEATHER},
                       {"name": "time", "parameters": {}}], indent=1)
    expected = {"content": "", "reasoning": "", "calls": [("weather", WEATHER), ("time", {})]}
    assert _whole(ChoiceOutput(None, RequiredCallsParser()), text) == expected
    assert _stream(ChoiceOutput(None, RequiredCallsParser()), text) == expected
    args = json.dumps(WEATHER)
    named = {"content": "", "reasoning": "", "calls": [("weather", WEATHER)]}
    assert _whole(ChoiceOutput(None, NamedCallParser("weather")), args) == named
    streamed = ChoiceOutput(None, NamedCallParser("weather"))
    first = streamed.deltas(args[:2], final=False)  # the header, then the first fragment
    assert first[0].tool_calls[0].function.name == "weather"
    assert first[1].tool_calls[0].function.arguments == args[:2]
    assert streamed.finish_reason("stop") == "stop"  # as vLLM reports a named call


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), [
    ("deepseek_r1", "<think>2 + 2 is 4.</think>\n\nIt is 4.", "2 + 2 is 4.", "It is 4."),
    # the template opened <think>
    ("deepseek_r1", "2 + 2 is 4.</think>It is 4.", "2 + 2 is 4.", "It is 4."),
    ("deepseek_r1", "still thinking", "still thinking", ""),
    ("qwen3", "<think>\nHm.\n</think>\n\nIt is 4.", "\nHm.\n", "It is 4."),
    ("qwen3", "It is 4.", "", "It is 4."),  # enable_thinking=False: no tags
])
def test_reasoning_parsers(parser, text, reasoning, content):
    expected = {"content": content, "reasoning": reasoning, "calls": []}
    assert _whole(ChoiceOutput(get_reasoning_parser(parser), None), text) == expected
    for step in (1, 5):
        assert _stream(ChoiceOutput(get_reasoning_parser(parser), None), text, step) == expected
    hidden = ChoiceOutput(get_reasoning_parser(parser), None, include_reasoning=False)
    assert _whole(hidden, text)["reasoning"] == ""


def test_reasoning_then_tool_call():
    text = "<think>Need weather.</think>" + HERMES_TEXT
    out = _stream(ChoiceOutput(get_reasoning_parser("qwen3"), get_tool_parser("hermes")), text)
    assert out["reasoning"] == "Need weather." and len(out["calls"]) == 2


def test_unknown_parser_names():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="qwen3"):
        get_reasoning_parser("nope")


def test_tool_turns_for_a_template_without_tools():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "1", "type": "function",
                     "function": {"name": "weather", "arguments": json.dumps(WEATHER)}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    out = tool_turns_as_text(messages, tools)
    assert out[0]["role"] == "system" and '"weather"' in out[0]["content"]
    assert "<tool_call>" in out[2]["content"] and '"Paris"' in out[2]["content"]
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
