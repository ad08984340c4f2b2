"""The contract between the front end (``LLM``, the API server) and the engine core.

Everything that crosses between them is one of these structs, whether the core runs in the same
process or in its own (then msgpack-encoded by ``engine.serial``, tensors as raw buffers). Text
never reaches the core: it sees token ids, sampling parameters and images only. One message a
step comes back: each request's new token ids, finish reason and logprobs, and the step's stats.
"""

from __future__ import annotations

import enum

import msgspec

from pagedllm.multimodal.inputs import ImageFeature, MRopePositions
from pagedllm.sampling_params import SamplingParams

# (token ids, logprobs, rank of the first id): the first id is the chosen/actual token.
LogprobsEntry = tuple[list[int], list[float], int]


class FinishReason(enum.IntEnum):
    """Why a request ended, as the core decides it (stop strings are the front end's)."""

    STOP = 0  # a stop token (EOS or stop_token_ids)
    LENGTH = 1  # max_tokens or max_model_len
    ABORT = 2
    ERROR = 3  # failed inside the core; ``EngineCoreOutput.error`` says how

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One scheduler request: a whole user request, or one sample of an ``n > 1`` request.
    Validated by the front end; ``sampling_params.n`` is 1 and its stop ids are filled."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    # A sample of an n > 1 request waits until this sibling computed the shared prompt, then
    # reuses its KV blocks through the prefix cache.
    wait_for: str | None = None
    images: tuple[ImageFeature, ...] = ()
    mrope: MRopePositions | None = None
    priority: int = 0  # under --scheduling-policy priority: lower first (ties by arrival)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one request got in one step."""

    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[LogprobsEntry] | None = None  # one entry per new token
    # Prompt logprobs of this step's prompt chunk: entry j scores prompt token (start + j + 1).
    new_prompt_logprobs: list[LogprobsEntry] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id in ``stop_token_ids`` that ended it
    error: str | None = None  # with FinishReason.ERROR


class EngineStats(msgspec.Struct, array_like=True, gc=False):
    """The core's counters after a step; cumulative ones only grow."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of blocks held by requests
    num_preemptions: int  # cumulative
    prompt_tokens: int  # cumulative prompt tokens computed (prefix-cache hits excluded)
    generation_tokens: int  # cumulative sampled tokens
    prefix_cache_queries: int  # cumulative, in tokens
    prefix_cache_hits: int
    num_free_blocks: int
    num_total_blocks: int
    step_num_reqs: int  # of the last step
    step_num_tokens: int


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One step's message from the core (or, ``is_step=False``, its state after aborts)."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    timestamp: float  # time.monotonic() in the core (the same clock in every process)
    # Requests scheduled for the first time this step, with their prefix-cache hit in tokens.
    first_scheduled: list[tuple[str, int]] = []
    is_step: bool = True


class EngineCoreInfo(msgspec.Struct, array_like=True, gc=False):
    """What the core tells the front end once it is ready."""

    num_blocks: int
    block_size: int


class UtilityCall(msgspec.Struct, array_like=True, gc=False):
    """A method of ``EngineCore`` called by name between steps (today: ``get_stats``)."""

    call_id: int
    method: str


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    result: EngineStats | None = None
    error: str | None = None
