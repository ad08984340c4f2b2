"""Reasoning parsers: a thinking model's text -> ``reasoning_content`` and ``content``
(``--reasoning-parser NAME``). Both registered formats think between ``<think>`` and
``</think>``:

- ``deepseek_r1``: the chat template may open ``<think>`` itself, so text before ``</think>`` is
  reasoning even without an opening tag; text with no ``</think>`` yet is all reasoning.
- ``qwen3``: thinking only when the text opens with ``<think>`` (``enable_thinking=False`` in
  ``chat_template_kwargs`` gives none): otherwise the text is all content.

As with tool parsers, ``split`` reads the whole text so far and never shows as content what a
later token could turn into reasoning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from pagedllm.entrypoints.openai.tool_parsers import held_back

START, END = "<think>", "</think>"


class ReasoningParser(ABC):
    name: ClassVar[str]

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of ``text``."""
        stripped = text.lstrip()
        opened = stripped.startswith(START)
        if not opened and not final and START.startswith(stripped):
            return "", ""  # maybe the opening tag's first characters
        body = stripped[len(START):] if opened else text
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END):].lstrip()
        if not self.thinks_without_tag(opened):
            return "", text
        cut = len(body) if final else len(body) - held_back(body, END)
        return body[:cut], ""

    @abstractmethod
    def thinks_without_tag(self, opened: bool) -> bool:
        """Whether text with no ``</think>`` (yet) is reasoning."""


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    def thinks_without_tag(self, opened: bool) -> bool:
        return True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def thinks_without_tag(self, opened: bool) -> bool:
        return opened


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"Unknown reasoning parser {name!r}; available: "
                         f"{', '.join(sorted(REASONING_PARSERS))}.")
    return REASONING_PARSERS[name]()
