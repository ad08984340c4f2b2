"""OpenAI-style chat messages -> what the chat template renders, plus the images they carry.

Content may be a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image_url", "image_url": {"url": ...}}`` (a data URL, or file/http URLs where the
server allows them) and, offline, ``{"type": "image_pil", "image_pil": <PIL image>}``. For an image
model the parts reach the template as a list (images as ``{"type": "image"}``, so the template
writes the model's placeholder); for a text model the text parts are joined into one string.
"""

from __future__ import annotations

from typing import Any

from pagedllm.tokenizer import Tokenizer


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], takes_images: bool,
                add_generation_prompt: bool = True, continue_final_message: bool = False
                ) -> tuple[str, list[int], list[Any]]:
    """A conversation through the chat template: (text, its token ids, image sources in order),
    for the offline ``LLM.chat`` and the server alike. Raises ValueError on what it cannot take.

    ``continue_final_message`` (vLLM's, after transformers') ends the text right after the last
    message's content, so that the model continues that message rather than starting a new one.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
    rendered, images = parse_chat_messages(messages, takes_images)
    try:
        text = tokenizer.apply_chat_template(rendered,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template's raise_exception(), a missing template
        raise ValueError(f"The chat template could not render the messages: {e}") from None
    if continue_final_message:
        text = _cut_after(text, message_text(rendered[-1]).strip())
    # The template writes the special tokens (BOS included) itself.
    return text, tokenizer.encode(text, add_special_tokens=False), images


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
