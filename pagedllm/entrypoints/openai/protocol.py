"""OpenAI API shapes shared by the endpoints: errors, usage, models, tokenize, sampling fields.

Requests validate types here (a wrong type is a 400); value ranges are checked once, by
``SamplingParams``. Responses follow OpenAI's schema so the official client parses them.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from pagedllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

# A request's integers reach the engine core through msgpack (64 bits at most) and int64 tensors:
# a larger one is a 400 naming its field here. Unchecked, 10**400 in stop_token_ids failed the
# encode on the front-end thread and stopped the server. (seed is checked by SamplingParams: it
# may be up to 2**64 - 1.)
EngineInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's documented range; vLLM clamps to it


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    # Unknown request fields are ignored (OpenAI adds fields faster than servers follow).
    model_config = ConfigDict(extra="ignore")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False  # vLLM's: the tokens' strings too


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[EngineInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class DropNoneModel(BaseModel):
    """A response part whose unset (None) fields are left out of the JSON (stream deltas)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


# vLLM request fields pagedllm does not implement: refused by name when set, never ignored.
# (Other unknown fields are ignored, as OpenAI adds fields faster than servers follow.)
UNSUPPORTED_VLLM_FIELDS = ("logits_processors", "structural_tag",
                           "guided_whitespace_pattern", "kv_transfer_params", "vllm_xargs",
                           "cache_salt", "documents", "mm_processor_kwargs", "chat_template",
                           "functions", "function_call", "thinking_token_budget")


class SamplingRequest(OpenAIModel):
    """The fields completions and chat completions share (OpenAI's plus vLLM's extras)."""

    model_config = ConfigDict(extra="allow")  # extras are ignored, vLLM's unsupported refused

    model: str | None = None
    n: EngineInt = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: EngineInt | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[EngineInt] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: EngineInt = 0
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    use_beam_search: bool = False  # vLLM's beam search, n beams (serving_beam.py)
    length_penalty: float = 1.0  # beam search's score: cum_logprob / length ** length_penalty
    priority: EngineInt = 0  # lower first; other than 0 only with --scheduling-policy priority
    truncate_prompt_tokens: EngineInt | None = None  # keep the last N tokens (-1: max_model_len)
    return_token_ids: bool = False  # prompt_token_ids and token_ids in the response
    return_tokens_as_token_ids: bool = False  # logprobs' tokens as "token_id:<id>"
    allowed_token_ids: list[EngineInt] | None = None
    bad_words: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (where := lone_surrogate_at(data)) is not None:
            raise ValueError(f"{where or 'the request'} is not valid Unicode: it holds a lone "
                             "surrogate.")
        return data

    def unsupported_fields(self) -> list[str]:
        """vLLM's fields in this request that pagedllm does not implement."""
        extra = self.model_extra or {}
        return [name for name in UNSUPPORTED_VLLM_FIELDS
                if extra.get(name) not in (None, [], {}, "")]

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true.")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.include_usage and self.stream_options
                    and self.stream_options.continuous_usage_stats)

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None = None,
                           structured: StructuredOutputsParams | None = None,
                           defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Raises ``ValueError`` (a 400) on an out-of-range value, naming the field. Fields the
        request leaves unset take ``defaults`` (the model's generation_config.json), if any."""
        optional: dict[str, Any] = (defaults or {}) | {
            name: getattr(self, name)
            for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                         "frequency_penalty", "repetition_penalty")
            if getattr(self, name) is not None
        }
        return SamplingParams(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias=_int_keys(self.logit_bias),
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=structured, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, **optional)


def lone_surrogate_at(body: Any) -> str | None:
    """Where in a parsed JSON body a string that UTF-8 cannot encode is (JSON's \\ud800
    escapes make lone surrogates), or None. Such a string, in a stop string or a grammar, failed
    the engine core's msgpack encode and stopped the server's front-end loop. Iterative: a body
    nested as deep as the JSON parser allows must not overflow the stack here."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return None


def _int_keys(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """Token ids as ints, biases clamped to [-100, 100] as vLLM does; NaN is refused."""
    if not logit_bias:
        return None
    try:
        keys = [int(k) for k in logit_bias]
    except ValueError:
        raise ValueError("logit_bias keys must be token ids (integers as strings).") from None
    if any(math.isnan(v) for v in logit_bias.values()):
        raise ValueError("logit_bias values must be numbers, got NaN.")
    # An unchecked bias of 1e308 failed its engine step (a float32 overflow): a 500.
    return {k: min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, v))
            for k, v in zip(keys, logit_bias.values())}
