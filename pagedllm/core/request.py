"""Request: one sequence's tokens and progress, as the scheduler and KV cache manager see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.multimodal.inputs import ImageFeature, MRopePositions


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # failed inside the engine; the others in its step go on

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """Invariant: ``num_computed_tokens <= num_tokens + num_pending``; the tokens in between
    are what the scheduler still owes this request (a prompt chunk, or the last sampled token,
    which with async scheduling may still be on its way from the GPU)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # Under the priority policy a lower value is served first (ties by arrival_time).
    priority: int = 0
    # A sample of an n > 1 request waits until its first sibling computed the prompt, so it
    # can reuse the prompt's KV blocks through the prefix cache instead of computing them again.
    wait_for: Request | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # including the tokens of steps scheduled, even in flight
    # Tokens being sampled by a step in flight (0 or 1): scheduled for computing, not yet known.
    num_pending: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | None = None  # the stop token id that ended it
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1: not yet scheduled)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    images: tuple[ImageFeature, ...] = ()  # in prompt order, placeholders already expanded
    mrope: MRopePositions | None = None  # for models with multimodal rotary positions

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return prompt[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def ready(self) -> bool:
        """False while waiting for a sibling to compute the shared prompt, or (preempted) for
        its last token to arrive from a step in flight."""
        parent = self.wait_for
        return self.num_pending == 0 and (parent is None or parent.is_finished or (
            parent.num_computed_tokens >= parent.num_prompt_tokens))
