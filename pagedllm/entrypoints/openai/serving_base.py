"""What the completion and chat endpoints share: model check, prompt checks, request groups."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pagedllm.engine.async_llm import AsyncLLM, OutputStream
from pagedllm.engine.beam_search import BeamSearchParams
from pagedllm.engine.frontend import check_priority
from pagedllm.engine.inputs import ProcessedPrompt
from pagedllm.entrypoints.openai.errors import APIError, ModelNotFound
from pagedllm.entrypoints.openai.logprobs import LogprobFormatter, PromptLogprobs
from pagedllm.entrypoints.openai.protocol import SamplingRequest
from pagedllm.entrypoints.openai.serving_beam import beam_params
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: Sequence[str]) -> None:
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        defaults = dict(engine.default_sampling)
        # generation_config.json's max_new_tokens caps every request's output (as in vLLM)
        self.default_max_tokens: int | None = defaults.pop("max_tokens", None)
        self.default_sampling = defaults  # the fields a request leaves unset take these
        self.logprobs = LogprobFormatter(self.tokenizer)

    def model_name(self, requested: str | None) -> str:
        """The name to report; 404 for a model this server does not serve."""
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise ModelNotFound(requested)
        return requested

    def max_logprobs(self) -> int:
        return int(self.engine.config.model.max_logprobs)

    def check_prompt(self, token_ids: Sequence[int], param: str) -> None:
        if not token_ids:
            raise APIError("The prompt is empty: at least one token is needed.", param=param)
        vocab = int(getattr(self.tokenizer, "vocab_size", 0) or 0)
        if vocab and not all(isinstance(t, int) and 0 <= t < vocab for t in token_ids):
            bad = next(t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab))
            raise APIError(f"Token id {bad} is out of vocabulary (vocab size {vocab}).",
                           param=param)

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, param: str) -> int | None:
        """``max_tokens``, defaulted to the room left in the context and capped by the model's
        ``max_new_tokens`` (generation_config.json), as vLLM does; 400 if it does not fit.

        A non-positive value is passed through for ``SamplingParams`` to refuse by name.
        """
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_len} input tokens, which leaves no room for the completion. "
                "Please reduce the length of the input.", param=param,
                code="context_length_exceeded")
        room = limit - prompt_len
        if max_tokens is None:
            return min(room, self.default_max_tokens or room)
        if max_tokens > room:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in "
                "the completion). Please reduce the length of the input or the completion.",
                param="max_tokens", code="context_length_exceeded")
        return min(max_tokens, self.default_max_tokens or max_tokens)

    def beam_search_params(self, request: SamplingRequest, token_ids: Sequence[int],
                           max_tokens: int | None, param: str) -> BeamSearchParams:
        """A ``use_beam_search`` request's search over one prompt (``param`` names it)."""
        self.check_prompt(token_ids, param)
        resolved = self.resolve_max_tokens(len(token_ids), max_tokens, param)
        if resolved is None or resolved < 1:
            raise APIError(f"max_tokens must be at least 1, got {resolved}.",
                           param="max_tokens")
        return beam_params(request, resolved, self.default_sampling)

    def check_vllm_fields(self, request: SamplingRequest) -> None:
        """vLLM's request fields that pagedllm does not implement are refused, never ignored."""
        try:
            check_priority(request.priority, self.engine.config.scheduler.scheduling_policy)
        except ValueError as e:
            raise APIError(str(e), param="priority") from None
        unsupported = request.unsupported_fields()
        if unsupported:
            raise APIError(f"{unsupported[0]} is not supported by pagedllm.",
                           param=unsupported[0])
        n = request.truncate_prompt_tokens
        if n is not None and not (n == -1 or 1 <= n <= self.max_model_len):
            raise APIError(f"truncate_prompt_tokens must be -1 or between 1 and max_model_len "
                           f"({self.max_model_len}), got {n}.", param="truncate_prompt_tokens")

    def check_n(self, n: int) -> None:
        # vLLM's bound (VLLM_MAX_N_SEQUENCES) is 16384; n samples beyond what one batch holds
        # would run in waves for minutes while holding the request open.
        limit = self.engine.config.scheduler.max_num_seqs
        if n > limit:
            raise APIError(f"n must be at most max_num_seqs ({limit}), got {n}.", param="n")

    def truncate(self, token_ids: list[int], keep: int | None) -> list[int]:
        """The last ``keep`` tokens (vLLM's ``truncate_prompt_tokens``; -1: max_model_len)."""
        if keep is None:
            return token_ids
        return token_ids[-(self.max_model_len if keep == -1 else keep):]

    def check_logprobs(self, value: int | None, param: str) -> None:
        if value is not None and value > self.max_logprobs():
            raise APIError(f"Requested {param} of {value}, which is greater than the maximum "
                           f"allowed: {self.max_logprobs()}.", param=param)

    def check_prompt_logprobs(self, value: int | None, stream: bool) -> None:
        self.check_logprobs(value, "prompt_logprobs")
        if value is not None and stream:  # vLLM's rule: they come with the whole answer
            raise APIError("prompt_logprobs are not available when stream is true.",
                           param="prompt_logprobs")

    async def add(self, request_id: str, prompts: Sequence[list[int] | ProcessedPrompt],
                  params: Sequence[SamplingParams], priority: int) -> OutputStream:
        """Adds one engine request per prompt (``{request_id}-{i}``); all or none."""
        return await self.engine.add_requests(
            [(f"{request_id}-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params,
                                                                          strict=True))],
            priority)

    def prompt_logprobs(self, out: RequestOutput, requested: int | None) -> PromptLogprobs | None:
        """The prompt's logprobs as vLLM returns them, when the request asked for them."""
        if requested is None or out.prompt_logprobs is None:
            return None
        return self.logprobs.prompt(out.prompt_logprobs)

    @staticmethod
    def prompt_index(out: RequestOutput) -> int:
        return int(out.request_id.rsplit("-", 1)[1])

    @staticmethod
    def check_stream_options(request: Any) -> None:
        try:
            request.check_stream_options()
        except ValueError as e:
            raise APIError(str(e), param="stream_options") from None
