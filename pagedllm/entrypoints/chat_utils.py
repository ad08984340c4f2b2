"""OpenAI-style chat messages -> what the chat template renders, plus the images they carry.

Content may be a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image_url", "image_url": {"url": ...}}`` (a data URL, or file/http URLs where the
server allows them) and, offline, ``{"type": "image_pil", "image_pil": <PIL image>}``. For an image
model the parts reach the template as a list (images as ``{"type": "image"}``, so the template
writes the model's placeholder); for a text model the text parts are joined into one string.
"""

from __future__ import annotations

import json
from typing import Any

from pagedllm.tokenizer import Tokenizer


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], takes_images: bool,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict[str, Any]] | None = None,
                template_kwargs: dict[str, Any] | None = None
                ) -> tuple[str, list[int], list[Any]]:
    """A conversation through the chat template: (text, its token ids, image sources in order),
    for the offline ``LLM.chat`` and the server alike. Raises ValueError on what it cannot take.

    ``continue_final_message`` (vLLM's, after transformers') ends the text right after the last
    message's content, so that the model continues that message rather than starting a new one.
    ``tools`` (OpenAI's function definitions) and ``template_kwargs`` (e.g. Qwen3's
    ``enable_thinking``) reach the template as variables.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
    rendered, images = parse_chat_messages(messages, takes_images)
    if not _knows_tools(tokenizer.chat_template) and (tools or _has_tool_turns(rendered)):
        rendered = tool_turns_as_text(rendered, tools)
    try:
        text = tokenizer.apply_chat_template(rendered,
                                             add_generation_prompt=add_generation_prompt,
                                             tools=tools or None, **(template_kwargs or {}))
    except Exception as e:  # a template's raise_exception(), a missing template
        raise ValueError(f"The chat template could not render the messages: {e}") from None
    if continue_final_message:
        text = _cut_after(text, message_text(rendered[-1]).strip())
    # The template writes the special tokens (BOS included) itself.
    return text, tokenizer.encode(text, add_special_tokens=False), images


def _knows_tools(template: str | None) -> bool:
    return template is not None and "tool" in template


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def tool_turns_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                       ) -> list[dict[str, Any]]:
    """For a template that knows no tools (SmolLM2's): the tools are described in the system
    message and tool calls written in the assistant's text, Hermes style (``<tool_call>``),
    so that the model sees them. Templates that render tools get the messages as they are."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        text = message_text(m) + "".join(
            "\n<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                            "arguments": _arguments(c["function"])})
            + "\n</tool_call>" for c in calls)
        if m.get("role") == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        out.append({**m, "content": text.strip()})
    if tools:
        listing = "\n".join(json.dumps(t) for t in tools)
        prompt = ("You may call one or more functions. Function signatures, within <tools>:\n"
                  f"<tools>\n{listing}\n</tools>\nFor each call, write a JSON object with "
                  "the function's name and arguments within <tool_call></tool_call> tags.")
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(function: dict[str, Any]) -> Any:
    args = function.get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its content string, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""


def _cut_after(text: str, final: str) -> str:
    # The template may strip the content; its last occurrence is the final message's.
    at = text.rfind(final) if final else -1
    if at < 0:
        raise ValueError("continue_final_message: the final message's content does not appear "
                         "in the rendered chat.")
    return text[:at + len(final)]


def parse_chat_messages(messages: list[dict[str, Any]], takes_images: bool
                        ) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages for the template, image sources in order). Raises ValueError on a part it
    cannot take."""
    rendered, images = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "image_pil"):
                if not takes_images:
                    raise ValueError("This model does not take image inputs; only 'text' "
                                     "content parts are supported.")
                images.append(_image_source(part, kind))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"Content part type {kind!r} is not supported; use 'text'"
                                 + (", 'image_url' or 'image_pil'." if takes_images else "."))
        if not takes_images:
            parts = "\n".join(p["text"] for p in parts)
        rendered.append({**message, "content": parts})
    return rendered, images


def _image_source(part: dict[str, Any], kind: str) -> Any:
    value = part.get(kind)
    if kind == "image_url" and isinstance(value, dict):
        value = value.get("url")
    if value is None or (kind == "image_url" and not isinstance(value, str)):
        raise ValueError(f"A {kind!r} content part needs its {kind!r} field"
                         + (" with a 'url' string." if kind == "image_url" else "."))
    return value
