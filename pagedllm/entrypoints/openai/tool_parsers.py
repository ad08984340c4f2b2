"""Tool parsers: a model's text -> content and tool calls (``--tool-call-parser NAME``).

Each parser reads the whole text so far (``final``: the text is complete) and returns the content
that is safe to show (never text that a later token could turn into a tool call) and the tool
calls complete so far. Streaming sends what is new since the last call, so a parser only needs
to be right about the text it is given. Registered: ``hermes`` (Qwen2.5/Qwen3, Hermes:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) and ``llama3_json`` (Llama 3.1-3.3:
``{"name": ..., "parameters": {...}}``, several joined by ``;``, after an optional
``<|python_tag|>``).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

_DECODER = json.JSONDecoder()


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass
class ParsedOutput:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def call_from_json(obj: Any, arguments_key: str = "arguments") -> ParsedCall | None:
    """``{"name": str, arguments_key: object}`` as a call; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    name: ClassVar[str]

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Content safe to show and the complete tool calls of ``text``."""


class HermesToolParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(self.START)
        if start < 0:
            cut = len(text) if final else len(text) - held_back(text, self.START)
            return ParsedOutput(text[:cut])
        calls = []
        for match in self._CALL.finditer(text, start):
            closed = match.group(0).endswith(self.END)
            if not (closed or final):
                break
            try:
                call = call_from_json(json.loads(match.group(1).strip()))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        content = text[:start]
        if not calls and final:  # markers but nothing that parses: the text is the answer
            return ParsedOutput(text)
        return ParsedOutput(content, calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        body = text.removeprefix(self.PYTHON_TAG).lstrip()
        if not body or (not body.startswith("{") and (
                final or not self.PYTHON_TAG.startswith(text.strip()))):
            return ParsedOutput(text if body or final else "")
        if not body.startswith("{"):  # maybe the tag's first characters: wait and see
            return ParsedOutput("")
        calls, at = [], 0
        while at < len(body):
            try:
                obj, end = _DECODER.raw_decode(body, at)
            except json.JSONDecodeError:
                break
            call = call_from_json(obj, "parameters")
            if call is None:
                break
            calls.append(call)
            at = end
            rest = body[at:].lstrip()
            if not rest.startswith(";"):
                break
            at = len(body) - len(rest) + 1
            while at < len(body) and body[at].isspace():
                at += 1
        if final and not calls:
            return ParsedOutput(text)
        return ParsedOutput("", calls)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"Unknown tool call parser {name!r}; available: "
                         f"{', '.join(sorted(TOOL_PARSERS))}.")
    return TOOL_PARSERS[name]()
