"""``POST /v1/chat/completions``: messages -> chat template -> one engine request (n samples).

Streaming sends each choice's ``role: assistant`` chunk first, then reasoning, content and tool
call deltas; a choice's ``finish_reason`` rides on its last chunk only. ``ChatOptions`` are the
server's flags for tools and reasoning (``--enable-auto-tool-choice``, ``--tool-call-parser``,
``--reasoning-parser``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.beam_search import BeamSearchParams
from pagedllm.engine.inputs import ProcessedPrompt
from pagedllm.entrypoints.chat_utils import message_text, render_chat
from pagedllm.entrypoints.openai.chat_output import ChoiceOutput
from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.logprobs import ChatLogprobs
from pagedllm.entrypoints.openai.protocol import UsageInfo, now, random_id
from pagedllm.entrypoints.openai.protocol_chat import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    DeltaMessage,
)
from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.serving_beam import BeamStream, check_beam_request
from pagedllm.entrypoints.openai.streaming import Outputs, respond
from pagedllm.entrypoints.openai.tool_calls import ToolChoice
from pagedllm.entrypoints.openai.tool_parsers import ToolParser, get_tool_parser
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.backend import check_grammar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatOptions:
    """The server's tool and reasoning flags (vLLM's)."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser.")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # an unknown name fails at start-up
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLM, served_model_names: Sequence[str],
                 options: ChatOptions | None = None) -> None:
        super().__init__(engine, served_model_names)
        self.options = options or ChatOptions()

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        model = self.model_name(request.model)
        self._check(request)
        tools = ToolChoice.of(request, self.options.enable_auto_tool_choice)
        check_beam_request(request, self.max_logprobs(),
                           tools.constrained or request.structured_params() is not None)
        prompt = self._truncate(request, await self.render(request))
        request_id = random_id("chatcmpl")
        stream: Outputs
        if request.use_beam_search:
            # vLLM streams beam search here (unlike completions): each choice's whole text
            # comes in one chunk once the search ends.
            stream = BeamStream(self.engine, request_id, [prompt.token_ids],
                                [self._beam_params(request, prompt)], request,
                                self._logprobs(request))
        else:
            params = self._params(request, prompt.token_ids, tools)
            stream = await self.add(request_id, [prompt], [params], request.priority)
        job = _ChatJob(self, request, request_id, model, prompt.token_ids, tools)
        return await respond(raw, job, stream, bool(request.stream))

    def choice_output(self, request: ChatCompletionRequest, tools: ToolChoice) -> ChoiceOutput:
        """A fresh reader of one choice's text (parsers keep per-choice state)."""
        opts = self.options
        auto: ToolParser | None = (get_tool_parser(opts.tool_call_parser)
                                   if opts.tool_call_parser else None)
        reasoning: ReasoningParser | None = (get_reasoning_parser(opts.reasoning_parser)
                                             if opts.reasoning_parser else None)
        return ChoiceOutput(reasoning, tools.parser(auto), request.include_reasoning)

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
                request.continue_final_message,
                [t.model_dump(exclude_none=True) for t in request.tools or []],
                request.chat_template_kwargs)
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
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        self.check_logprobs(request.top_logprobs, "top_logprobs")
        self.check_prompt_logprobs(request.prompt_logprobs, request.stream)

    def _params(self, request: ChatCompletionRequest, token_ids: list[int],
                tools: ToolChoice) -> SamplingParams:
        self.check_prompt(token_ids, "messages")
        max_tokens = self.resolve_max_tokens(len(token_ids), request.max_output_tokens,
                                             "messages")
        logprobs = self._logprobs(request)
        structured = request.structured_params()
        if tools.constrained:
            if structured is not None:
                raise APIError(f"tool_choice {tools.mode} cannot be combined with another "
                               "structured output (response_format, structured_outputs, "
                               "guided_*).", param="tool_choice")
            structured = tools.constraint(request)
            try:
                check_grammar(structured)
            except ValueError as e:
                raise APIError(f"tools: a function's parameters are not a valid JSON schema: "
                               f"{e}", param="tools") from None
        return request.to_sampling_params(max_tokens, logprobs, request.prompt_logprobs,
                                          structured, self.default_sampling)

    def _beam_params(self, request: ChatCompletionRequest,
                     prompt: ProcessedPrompt) -> BeamSearchParams:
        if prompt.images:  # each round re-sends the prompt: no image placeholders in it
            raise APIError("Images cannot be used with use_beam_search.", param="messages")
        return self.beam_search_params(request, prompt.token_ids, request.max_output_tokens,
                                       "messages")

    @staticmethod
    def _logprobs(request: ChatCompletionRequest) -> int | None:
        return (request.top_logprobs or 0) if request.logprobs else None


class _ChatJob:
    def __init__(self, serving: OpenAIServingChat, request: ChatCompletionRequest,
                 request_id: str, model: str, prompt_token_ids: list[int],
                 tools: ToolChoice) -> None:
        self.s = serving
        self.request = request
        self.outputs = [serving.choice_output(request, tools) for _ in range(request.n)]
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
                                    self.request.top_logprobs or 0,
                                    self.request.return_tokens_as_token_ids)

    async def response(self, stream: Outputs) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        async for out in stream:
            final = out
        assert final is not None  # the stream ends only after a finished output
        samples = sorted(final.outputs, key=lambda o: o.index)
        choices = []
        for o in samples:
            reader = self.outputs[o.index]
            message = reader.message(o.text)
            if self.echo:
                message.content = self.echo + (message.content or "")
            choices.append(ChatChoice(
                index=o.index, message=message, logprobs=self._logprobs(o),
                finish_reason=reader.finish_reason(o.finish_reason), stop_reason=o.stop_reason,
                token_ids=self._token_ids(o)))
        usage = UsageInfo.of(len(final.prompt_token_ids),
                             sum(len(o.token_ids) for o in samples))
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices,
            usage=usage, prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.s.prompt_logprobs(final, self.request.prompt_logprobs))

    async def chunks(self, stream: Outputs) -> AsyncIterator[ChatCompletionChunk]:
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
                reader = self.outputs[sample.index]
                deltas = reader.deltas(sample.text, sample.finish_reason is not None)
                # The token's extras (logprobs, ids, finish) ride on the last of its deltas.
                for delta in deltas[:-1]:
                    yield self._chunk([ChatStreamChoice(index=sample.index, delta=delta)])
                yield self._chunk([ChatStreamChoice(
                    index=sample.index, delta=deltas[-1] if deltas else DeltaMessage(),
                    logprobs=self._logprobs(sample),
                    finish_reason=reader.finish_reason(sample.finish_reason),
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
