"""``tools`` and ``tool_choice`` on chat requests, as vLLM serves them.

- ``none``: the tools reach the template, the answer is plain text.
- ``auto`` (the default with tools): the model decides; the server's ``--tool-call-parser`` reads
  tool calls out of its text (needs ``--enable-auto-tool-choice``, as in vLLM).
- ``required``: the output is constrained to a JSON list of ``{"name", "parameters"}`` objects,
  one of the tools each (at most one with ``parallel_tool_calls=false``).
- a named function: the output is constrained to that function's parameters schema.

So required and named calls are valid by construction: they go through the grammar engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.protocol_chat import ChatCompletionRequest, ChatTool
from pagedllm.entrypoints.openai.tool_parsers import (
    ParsedCall,
    ParsedOutput,
    ToolParser,
    call_from_json,
)
from pagedllm.sampling_params import StructuredOutputsParams

_DECODER = json.JSONDecoder()
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolChoice:
    """What a request's tools mean for its output: ``mode`` is none, auto, required or
    named (then ``function`` names the tool)."""

    mode: str
    function: str | None = None

    @classmethod
    def of(cls, request: ChatCompletionRequest, auto_enabled: bool) -> ToolChoice:
        """Raises APIError (400) naming the field for a choice the request cannot make."""
        choice, tools = request.tool_choice, request.tools or []
        if choice is None:
            choice = "auto" if tools else "none"
        if isinstance(choice, str):
            if choice != "none" and not tools:
                raise APIError(f'tool_choice "{choice}" needs tools.', param="tool_choice")
            if choice == "auto" and not auto_enabled:
                raise APIError('"auto" tool choice requires --enable-auto-tool-choice and '
                               "--tool-call-parser to be set (or pass tool_choice none, "
                               "required or a named function).", param="tool_choice")
            return cls(choice)
        names = [t.function.name for t in tools]
        if choice.function.name not in names:
            raise APIError(f"tool_choice names the function {choice.function.name!r}, which is "
                           f"not in tools ({', '.join(names) or 'none given'}).",
                           param="tool_choice")
        return cls("named", choice.function.name)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self, request: ChatCompletionRequest) -> StructuredOutputsParams | None:
        """The JSON schema that makes the output the call(s) (required and named)."""
        tools = request.tools or []
        if self.mode == "named":
            tool = next(t for t in tools if t.function.name == self.function)
            return StructuredOutputsParams(json=tool.function.parameters or _ANY_OBJECT)
        if self.mode == "required":
            schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                      "items": {"anyOf": [_call_schema(t) for t in tools]}}
            if not request.parallel_tool_calls:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def parser(self, auto_parser: ToolParser | None) -> ToolParser | None:
        """What reads the calls out of the text (None: the text is the answer)."""
        if self.mode == "named":
            return NamedCallParser(self.function or "")
        if self.mode == "required":
            return RequiredCallsParser()
        return auto_parser if self.mode == "auto" else None


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "name": {"type": "string", "enum": [tool.function.name]},
        "parameters": tool.function.parameters or _ANY_OBJECT},
        "required": ["name", "parameters"]}


class NamedCallParser(ToolParser):
    """The whole (constrained) text is the named function's arguments."""

    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [ParsedCall(self.function, text)] if final else [])


class RequiredCallsParser(ToolParser):
    """The (constrained) text is a JSON list of calls: each is complete once its object is."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        calls, at = [], text.find("[") + 1
        while 0 < at < len(text):
            while at < len(text) and text[at] in " \t\n\r,":
                at += 1
            try:
                obj, at = _DECODER.raw_decode(text, at)
            except json.JSONDecodeError:
                break
            call = call_from_json(obj, "parameters")
            if call is not None:
                calls.append(call)
        return ParsedOutput("", calls)
