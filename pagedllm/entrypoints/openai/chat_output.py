"""One chat choice's text as the assistant's message: reasoning, content and tool calls.

The reasoning parser (if any) splits the thinking off first; the tool parser (if any) reads the
calls out of the rest. Streaming feeds the text as it grows and sends what is new: reasoning and
content fragments, then each tool call as it completes (its id and name first, then its
arguments; a named function's arguments stream token by token, as OpenAI sends them).
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import random_id
from pagedllm.entrypoints.openai.protocol_chat import (
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningParser
from pagedllm.entrypoints.openai.tool_calls import NamedCallParser
from pagedllm.entrypoints.openai.tool_parsers import ParsedCall, ToolParser


class ChoiceOutput:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None,
                 include_reasoning: bool = True) -> None:
        self.reasoning, self.tools = reasoning, tools
        self.include_reasoning = include_reasoning
        self.text = ""
        self._sent_reasoning = self._sent_content = self._sent_arguments = 0
        self._call_ids: list[str] = []

    @property
    def made_calls(self) -> bool:
        return bool(self._call_ids)

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" when the model stopped after calling tools of its choice."""
        chose = self.made_calls and not isinstance(self.tools, NamedCallParser)
        return "tool_calls" if reason == "stop" and chose else reason

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.reasoning is None:
            return "", text
        return self.reasoning.split(text, final)

    def message(self, text: str) -> ChatResponseMessage:
        reasoning, rest = self._split(text, True)
        calls: list[ParsedCall] = []
        if self.tools is not None:
            parsed = self.tools.parse(rest, True)
            rest, calls = parsed.content, parsed.calls
        self._call_ids = [random_id("chatcmpl-tool") for _ in calls]
        return ChatResponseMessage(
            content=rest if rest or not calls else None,
            reasoning_content=reasoning if reasoning and self.include_reasoning else None,
            tool_calls=[ToolCall(id=i, function=FunctionCall(name=c.name, arguments=c.arguments))
                        for i, c in zip(self._call_ids, calls)])

    def deltas(self, new_text: str, final: bool) -> list[DeltaMessage]:
        """What ``new_text`` (appended to the text so far) adds to the message."""
        self.text += new_text
        reasoning, rest = self._split(self.text, final)
        out = []
        if reasoning[self._sent_reasoning:] and self.include_reasoning:
            out.append(DeltaMessage(reasoning_content=reasoning[self._sent_reasoning:]))
        self._sent_reasoning = len(reasoning)
        if isinstance(self.tools, NamedCallParser):
            return out + self._argument_deltas(self.tools.function, rest)
        calls: list[ParsedCall] = []
        if self.tools is not None:
            parsed = self.tools.parse(rest, final)
            rest, calls = parsed.content, parsed.calls
        if rest[self._sent_content:]:
            out.append(DeltaMessage(content=rest[self._sent_content:]))
            self._sent_content = len(rest)
        for call in calls[len(self._call_ids):]:
            out += self._new_call(call.name)
            out.append(self._arguments(call.arguments))
        return out

    def _new_call(self, name: str) -> list[DeltaMessage]:
        self._call_ids.append(random_id("chatcmpl-tool"))
        return [DeltaMessage(tool_calls=[DeltaToolCall(
            index=len(self._call_ids) - 1, id=self._call_ids[-1], type="function",
            function=DeltaFunctionCall(name=name, arguments=""))])]

    def _arguments(self, fragment: str) -> DeltaMessage:
        return DeltaMessage(tool_calls=[DeltaToolCall(
            index=len(self._call_ids) - 1, function=DeltaFunctionCall(arguments=fragment))])

    def _argument_deltas(self, function: str, arguments: str) -> list[DeltaMessage]:
        out = [] if self._call_ids else self._new_call(function)
        if arguments[self._sent_arguments:]:
            out.append(self._arguments(arguments[self._sent_arguments:]))
            self._sent_arguments = len(arguments)
        return out
