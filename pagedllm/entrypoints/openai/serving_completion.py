"""``POST /v1/completions``: prompts in, text (or SSE chunks) out, one engine request per prompt.

Choice ``i * n + j`` is sample ``j`` of prompt ``i``. ``echo`` prepends the prompt (and, with
``logprobs``, its logprobs). Usage counts each prompt once and every generated token.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.logprobs import CompletionLogprobs
from pagedllm.entrypoints.openai.protocol import UsageInfo, now, random_id
from pagedllm.entrypoints.openai.protocol_completion import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.serving_beam import BeamStream, check_beam_request
from pagedllm.entrypoints.openai.streaming import Outputs, respond
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        model = self.model_name(request.model)
        self._check(request)
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise APIError(str(e), param="prompt") from None
        # A long prompt takes seconds to tokenize: off the event loop.
        token_lists = await asyncio.to_thread(
            lambda: [self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                     for p in prompts])
        keep = request.truncate_prompt_tokens
        token_lists = [self.truncate(ids, keep) for ids in token_lists]
        request_id = random_id("cmpl")
        stream: Outputs
        if request.use_beam_search:
            stream = BeamStream(self.engine, request_id, token_lists,
                                [self.beam_search_params(request, ids, request.max_tokens,
                                                         "prompt") for ids in token_lists],
                                request, request.logprobs)
        else:
            params = [self._params(request, ids) for ids in token_lists]
            stream = await self.add(request_id, token_lists, params, request.priority)
        # echo gives a truncated prompt's text from its tokens
        texts = [p if isinstance(p, str) and keep is None else None for p in prompts]
        job = _Job(self, request, request_id, model, texts)
        return await respond(raw, job, stream, bool(request.stream))

    def _check(self, request: CompletionRequest) -> None:
        if request.use_beam_search and request.stream:  # vLLM's refusal, checked first as there
            raise APIError("Streaming is not currently supported with beam search.",
                           param="stream")
        self.check_stream_options(request)
        self.check_vllm_fields(request)
        self.check_n(request.n)
        if request.suffix:
            raise APIError("suffix is not supported.", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError("best_of is not supported (it may only equal n).", param="best_of")
        self.check_logprobs(request.logprobs, "logprobs")
        self.check_prompt_logprobs(request.prompt_logprobs, request.stream)
        check_beam_request(request, self.max_logprobs(), request.structured_params() is not None)
        if request.use_beam_search and request.echo and request.logprobs is not None:
            raise APIError("echo with logprobs cannot be used with use_beam_search: beam search "
                           "computes no logprobs for the prompt.", param="echo")

    def _params(self, request: CompletionRequest, token_ids: list[int]) -> SamplingParams:
        self.check_prompt(token_ids, "prompt")
        max_tokens = self.resolve_max_tokens(len(token_ids), request.max_tokens, "prompt")
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
        return request.to_sampling_params(max_tokens, request.logprobs, prompt_logprobs,
                                          request.structured_params(), self.default_sampling)


class _Job:
    """One completion request's response, from the engine outputs of its prompts."""

    def __init__(self, serving: OpenAIServingCompletion, request: CompletionRequest,
                 request_id: str, model: str, prompt_texts: list[str | None]) -> None:
        self.s = serving
        self.request = request
        self.request_id = request_id
        self.model = model
        self.prompt_texts = prompt_texts
        self.created = now()

    def _echo(self, i: int, out: RequestOutput) -> str:
        text = self.prompt_texts[i]
        return text if text is not None else self.s.tokenizer.decode(out.prompt_token_ids)

    def _logprobs(self, out: RequestOutput, sample: CompletionOutput, echo: bool,
                  offset: int = 0) -> CompletionLogprobs | None:
        k = self.request.logprobs
        if k is None:
            return None
        fmt, as_ids = self.s.logprobs, self.request.return_tokens_as_token_ids
        lp = None
        if echo:
            positions = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            lp = fmt.completion(out.prompt_token_ids, positions, k, initial_offset=offset,
                                as_ids=as_ids)
        return fmt.completion(sample.token_ids, sample.logprobs or [], k, initial_offset=offset,
                              out=lp, as_ids=as_ids)

    def _token_ids(self, out: RequestOutput, sample: CompletionOutput,
                   with_prompt: bool) -> dict[str, list[int] | None]:
        """vLLM's ``return_token_ids`` fields of a choice (or of its chunk)."""
        if not self.request.return_token_ids:
            return {}
        return {"prompt_token_ids": list(out.prompt_token_ids) if with_prompt else None,
                "token_ids": list(sample.token_ids)}

    async def response(self, stream: Outputs) -> CompletionResponse:
        finals: dict[int, RequestOutput] = {}
        async for out in stream:
            finals[self.s.prompt_index(out)] = out
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i in range(len(self.prompt_texts)):
            out = finals[i]
            prompt_tokens += len(out.prompt_token_ids)
            prompt_logprobs = self.s.prompt_logprobs(out, self.request.prompt_logprobs)
            for sample in sorted(out.outputs, key=lambda o: o.index):
                completion_tokens += len(sample.token_ids)
                echo = self._echo(i, out) if self.request.echo else ""
                choices.append(CompletionChoice(
                    index=i * self.request.n + sample.index, text=echo + sample.text,
                    logprobs=self._logprobs(out, sample, self.request.echo),
                    finish_reason=sample.finish_reason, stop_reason=sample.stop_reason,
                    prompt_logprobs=prompt_logprobs, **self._token_ids(out, sample, True)))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices,
                                  usage=UsageInfo.of(prompt_tokens, completion_tokens))

    async def chunks(self, stream: Outputs) -> AsyncIterator[CompletionStreamResponse]:
        n = self.request.n
        started: set[int] = set()
        offsets: dict[int, int] = defaultdict(int)  # text_offset of each choice's next token
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        async for out in stream:
            i = self.s.prompt_index(out)
            prompt_tokens[i] = len(out.prompt_token_ids)
            for sample in out.outputs:
                index = i * n + sample.index
                first = index not in started
                echo = self.request.echo and first
                started.add(index)
                completion_tokens += len(sample.token_ids)
                text = (self._echo(i, out) if echo else "") + sample.text
                lp = self._logprobs(out, sample, echo, offsets[index])
                if lp is not None and lp.tokens:
                    offsets[index] = lp.text_offset[-1] + len(lp.tokens[-1])
                if not text and not sample.token_ids and sample.finish_reason is None:
                    continue
                usage = UsageInfo.of(sum(prompt_tokens.values()), completion_tokens) \
                    if self.request.continuous_usage else None
                yield self._chunk([CompletionChoice(
                    index=index, text=text, logprobs=lp, finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason, **self._token_ids(out, sample, first))],
                    usage)
        if self.request.include_usage:
            yield self._chunk([], UsageInfo.of(sum(prompt_tokens.values()), completion_tokens))

    def _chunk(self, choices: list[CompletionChoice],
               usage: UsageInfo | None) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.request_id, created=self.created,
                                        model=self.model, choices=choices, usage=usage)
