"""``/v1/completions`` request and response shapes (OpenAI's legacy completions API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from pagedllm.entrypoints.openai.logprobs import CompletionLogprobs, PromptLogprobs
from pagedllm.entrypoints.openai.protocol import (
    EngineInt,
    SamplingRequest,
    UsageInfo,
    now,
    random_id,
)
from pagedllm.entrypoints.openai.protocol_structured import StructuredFields


class CompletionRequest(SamplingRequest, StructuredFields):
    # A string, a list of strings, token ids, or a list of token-id lists.
    prompt: str | list[str] | list[EngineInt] | list[list[EngineInt]]
    max_tokens: EngineInt | None = 16
    logprobs: EngineInt | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: EngineInt | None = None
    prompt_logprobs: EngineInt | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt; raises ``ValueError`` for an empty list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be an empty list.")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token that ended it
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, per choice
    # vLLM's, with return_token_ids (streamed: the prompt's in a choice's first chunk)
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
