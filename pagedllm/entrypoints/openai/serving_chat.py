"""``POST /v1/chat/completions``: messages -> chat template -> one engine request (n samples).

Streaming sends each choice's ``role: assistant`` chunk first, then content deltas; a choice's
``finish_reason`` rides on its last chunk only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pagedllm.engine.async_llm import OutputStream
from pagedllm.engine.inputs import ProcessedPrompt
from pagedllm.entrypoints.chat_utils import message_text, render_chat
from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.logprobs import ChatLogprobs
from pagedllm.entrypoints.openai.protocol import UsageInfo, now, random_id
from pagedllm.entrypoints.openai.protocol_chat import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.streaming import respond
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        model = self.model_name(request.model)
        self._check(request)
        prompt = self._truncate(request, await self.render(request))
        params = self._params(request, prompt.token_ids)
        request_id = random_id("chatcmpl")
        stream = await self.add(request_id, [prompt], [params])
        job = _ChatJob(self, request, request_id, model, prompt.token_ids)
        return await respond(raw, job, stream, bool(request.stream))

    async def render(self, request: ChatCompletionRequest) -> ProcessedPrompt:
        """The conversation through the chat template, as token ids with its images."""
        if not request.messages:
            raise APIError("messages must not be empty.", param="messages")
        processor = self.engine.frontend.input_processor
        try:
            # A long conversation takes seconds to render and tokenize: off the event loop.
            text, token_ids, images = await asyncio.to_thread(
                render_chat, self.tokenizer,
                [m.model_dump(exclude_none=True) for m in request.messages],
                processor.supports_images, request.add_generation_prompt,
                request.continue_final_message)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        if not images:
            return ProcessedPrompt(token_ids, text)
        try:  # decoding and resizing images is CPU work: off the event loop
            return await asyncio.to_thread(processor.process, {
                "prompt_token_ids": token_ids, "multi_modal_data": {"image": images}})
        except ValueError as e:
            raise APIError(str(e), param="messages") from None

    def _truncate(self, request: ChatCompletionRequest, prompt: ProcessedPrompt
                  ) -> ProcessedPrompt:
        if request.truncate_prompt_tokens is None:
            return prompt
        if prompt.images:  # cutting could split an image's placeholder tokens
            raise APIError("truncate_prompt_tokens cannot be used with images.",
                           param="truncate_prompt_tokens")
        return ProcessedPrompt(self.truncate(prompt.token_ids, request.truncate_prompt_tokens))

    def _check(self, request: ChatCompletionRequest) -> None:
        self.check_stream_options(request)
        self.check_vllm_fields(request)
        self.check_n(request.n)
        if request.tools:
            raise APIError("tools are not supported.", param="tools")
        fmt = (request.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(f"response_format {fmt!r} is not supported.", param="response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        self.check_logprobs(request.top_logprobs, "top_logprobs")
        self.check_prompt_logprobs(request.prompt_logprobs, request.stream)

    def _params(self, request: ChatCompletionRequest, token_ids: list[int]) -> SamplingParams:
        self.check_prompt(token_ids, "messages")
        max_tokens = self.resolve_max_tokens(len(token_ids), request.max_output_tokens,
                                             "messages")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        return request.to_sampling_params(max_tokens, logprobs, request.prompt_logprobs)


class _ChatJob:
    def __init__(self, serving: OpenAIServingChat, request: ChatCompletionRequest,
                 request_id: str, model: str, prompt_token_ids: list[int]) -> None:
        self.s = serving
        self.request = request
        self.request_id = request_id
        self.model = model
        self.created = now()
        self.echo = _echo_text(request)
        self.prompt_token_ids = prompt_token_ids if request.return_token_ids else None

    def _token_ids(self, sample: CompletionOutput) -> list[int] | None:
        return list(sample.token_ids) if self.request.return_token_ids else None

    def _logprobs(self, sample: CompletionOutput) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        return self.s.logprobs.chat(sample.token_ids, sample.logprobs or [],
                                    self.request.top_logprobs or 0)

    async def response(self, stream: OutputStream) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        async for out in stream:
            final = out
        assert final is not None  # the stream ends only after a finished output
        samples = sorted(final.outputs, key=lambda o: o.index)
        choices = [ChatChoice(index=o.index,
                              message=ChatResponseMessage(content=self.echo + o.text),
                              logprobs=self._logprobs(o), finish_reason=o.finish_reason,
                              stop_reason=o.stop_reason, token_ids=self._token_ids(o))
                   for o in samples]
        usage = UsageInfo.of(len(final.prompt_token_ids),
                             sum(len(o.token_ids) for o in samples))
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices,
            usage=usage, prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.s.prompt_logprobs(final, self.request.prompt_logprobs))

    async def chunks(self, stream: OutputStream) -> AsyncIterator[ChatCompletionChunk]:
        for index in range(self.request.n):
            first = self._chunk([ChatStreamChoice(
                index=index, delta=DeltaMessage(role="assistant", content=""))])
            first.prompt_token_ids = self.prompt_token_ids
            yield first
            if self.echo:
                yield self._chunk([ChatStreamChoice(index=index,
                                                    delta=DeltaMessage(content=self.echo))])
        prompt_tokens = completion_tokens = 0
        async for out in stream:
            prompt_tokens = len(out.prompt_token_ids)
            for sample in out.outputs:
                completion_tokens += len(sample.token_ids)
                if not sample.text and not sample.token_ids and sample.finish_reason is None:
                    continue
                usage = UsageInfo.of(prompt_tokens, completion_tokens) \
                    if self.request.continuous_usage else None
                yield self._chunk([ChatStreamChoice(
                    index=sample.index, delta=DeltaMessage(content=sample.text),
                    logprobs=self._logprobs(sample), finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason, token_ids=self._token_ids(sample))], usage)
        if self.request.include_usage:
            yield self._chunk([], UsageInfo.of(prompt_tokens, completion_tokens))

    def _chunk(self, choices: list[ChatStreamChoice],
               usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)


def _echo_text(request: ChatCompletionRequest) -> str:
    """What ``echo`` puts before the answer: as in vLLM, the last message's text when its role
    is the answer's (the assistant's, or with no generation prompt the last message's own)."""
    if not request.echo:
        return ""
    last = request.messages[-1]
    role = "assistant" if request.add_generation_prompt else last.role
    return message_text(last.model_dump()) if last.role == role else ""
