"""Engine logprobs -> OpenAI's two formats: the legacy completions one and chat's.

The engine gives, per generated token, ``{token_id: Logprob}`` holding the sampled token and the
top-k alternatives (rank 1 = most likely).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from pagedllm.outputs import Logprob


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob`` as its server returns it in ``prompt_logprobs``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per prompt token, keyed by token id; the first is None (it has no context).
PromptLogprobs = list[dict[int, PromptLogprob] | None]


def _clamp(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number.
    return max(x, -9999.0)


class LogprobFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def token_text(self, token_id: int, logprob: Logprob | None = None,
                   as_id: bool = False) -> str:
        """The token's text, or ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``:
        tokens that are not valid UTF-8 alone stay identifiable)."""
        if as_id:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _top(self, position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
        ranked = sorted(position.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
        return ranked[:k]

    def completion(self, token_ids: Sequence[int],
                   positions: Sequence[dict[int, Logprob] | None], k: int,
                   initial_offset: int = 0, out: CompletionLogprobs | None = None,
                   as_ids: bool = False) -> CompletionLogprobs:
        """Appends the tokens to ``out`` (streaming keeps one per choice for ``text_offset``).

        A position of ``None`` (the first prompt token when echoing) has no logprob.
        """
        out = out or CompletionLogprobs()
        offset = initial_offset if not out.text_offset else \
            out.text_offset[-1] + len(out.tokens[-1])
        for token_id, position in zip(token_ids, positions, strict=False):
            chosen = position.get(token_id) if position else None
            text = self.token_text(token_id, chosen, as_ids)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            out.token_logprobs.append(_clamp(chosen.logprob) if chosen else None)
            if position is None:
                out.top_logprobs.append(None)
                continue
            top = {self.token_text(t, lp, as_ids): _clamp(lp.logprob)
                   for t, lp in self._top(position, k)}
            if chosen is not None:
                top.setdefault(text, _clamp(chosen.logprob))
            out.top_logprobs.append(top)
        return out

    def prompt(self, positions: Sequence[dict[int, Logprob] | None]) -> PromptLogprobs:
        return [None if position is None else {
            token_id: PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank,
                                    decoded_token=self.token_text(token_id, lp))
            for token_id, lp in position.items()} for position in positions]

    def chat(self, token_ids: Sequence[int], positions: Sequence[dict[int, Logprob]],
             k: int, as_ids: bool = False) -> ChatLogprobs:
        content = []
        for token_id, position in zip(token_ids, positions, strict=False):
            chosen = position.get(token_id)
            text = self.token_text(token_id, chosen, as_ids)
            content.append(ChatTokenLogprob(
                token=text, logprob=_clamp(chosen.logprob) if chosen else -9999.0,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[ChatTopLogprob(token=(t := self.token_text(i, lp, as_ids)),
                                             logprob=_clamp(lp.logprob),
                                             bytes=list(t.encode("utf-8")))
                              for i, lp in self._top(position, k)]))
        return ChatLogprobs(content=content)
