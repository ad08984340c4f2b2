"""``/v1/chat/completions`` request and response shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.entrypoints.openai.logprobs import ChatLogprobs, PromptLogprobs
from pagedllm.entrypoints.openai.protocol import (
    DropNoneModel,
    EngineInt,
    OpenAIModel,
    SamplingRequest,
    UsageInfo,
    now,
    random_id,
)
from pagedllm.entrypoints.openai.protocol_structured import StructuredFields


class ChatMessage(OpenAIModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... reach the template

    role: str
    content: str | list[dict[str, Any]] | None = None


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest, StructuredFields):
    messages: list[ChatMessage]
    max_tokens: EngineInt | None = None
    max_completion_tokens: EngineInt | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: EngineInt | None = None
    prompt_logprobs: EngineInt | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the model continues the last message
    echo: bool = False  # vLLM's: the last message's content starts the answer (same role)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: extra template variables
    include_reasoning: bool = True  # vLLM's: reasoning_content in the answer

    @property
    def max_output_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, on the response (one prompt)
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class DeltaFunctionCall(DropNoneModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(DropNoneModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(DropNoneModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids: this chunk's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids: first chunks
