"""Stats collection: the engine's counters and each step's outputs -> typed per-step records.

Fed on the engine thread after every step (and after aborts, which free blocks between steps).
The engine reports cumulative counters; the collector turns them into deltas, and follows each
request's outputs to time its first token, the gaps between tokens and its end. Stat loggers
(Prometheus, the periodic log line) consume the records and never touch the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from pagedllm.outputs import RequestMetrics, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.messages import EngineStats


@dataclass(frozen=True)
class SchedulerStats:
    """The engine's state after a step: what gauges show."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    num_free_blocks: int = 0
    num_total_blocks: int = 0


@dataclass(frozen=True)
class FinishedRequestStats:
    """One ended request, with vLLM's per-request phases (seconds; None where the request
    never reached the phase, or ended outside a step's outputs: aborted or failed)."""

    finish_reason: str  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float | None = None
    queue_time: float | None = None  # arrival -> first scheduled
    n: int = 1
    max_tokens: int | None = None
    prefill_time: float | None = None  # first scheduled -> first token
    decode_time: float | None = None  # first token -> last token
    inference_time: float | None = None  # first scheduled -> last token
    time_per_output_token: float | None = None  # decode time / (generated tokens - 1)


@dataclass
class IterationStats:
    """What happened since the previous record: one engine step, or aborts between steps."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # in tokens
    prefix_cache_hits: int = 0
    step_num_tokens: int | None = None  # None: no step ran
    step_num_reqs: int | None = None
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


class StatLogger(Protocol):
    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None: ...


@dataclass
class _Tracker:
    """One request as seen through its outputs."""

    kind: RequestOutputKind
    n: int = 1
    max_tokens: int | None = None
    num_prompt_tokens: int = 0
    tokens: dict[int, int] = field(default_factory=dict)  # sample index -> tokens so far
    first_token_seen: bool = False
    last_token_time: float | None = None


class StatsCollector:
    """Not thread-safe: owned by the engine thread."""

    def __init__(self) -> None:
        self._prev: EngineStats | None = None
        self._requests: dict[str, _Tracker] = {}

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        self._requests[request_id] = _Tracker(params.output_kind, params.n, params.max_tokens)

    def forget(self, request_ids: list[str]) -> None:
        """Drops requests that never ran (refused as part of a group)."""
        for request_id in request_ids:
            self._requests.pop(request_id, None)

    def record_step(self, stats: EngineStats,
                    outputs: list[RequestOutput]) -> tuple[SchedulerStats, IterationStats]:
        it = self._deltas(stats)
        it.step_num_tokens = stats.step_num_tokens
        it.step_num_reqs = stats.step_num_reqs
        for out in outputs:
            tracker = self._requests.get(out.request_id)
            if tracker is not None:
                self._follow(tracker, out, it)
        return scheduler_stats(stats), it

    def record_state(self, stats: EngineStats) -> tuple[SchedulerStats, IterationStats]:
        """The engine's state between steps (after adds): no step ran."""
        return scheduler_stats(stats), self._deltas(stats)

    def record_ended(self, stats: EngineStats, request_ids: list[str],
                     reason: str) -> tuple[SchedulerStats, IterationStats]:
        """Requests that ended outside a step's outputs: aborted ("abort") or failed ("error")."""
        it = self._deltas(stats)
        for request_id in request_ids:
            tracker = self._requests.pop(request_id, None)
            if tracker is not None:
                it.finished.append(FinishedRequestStats(
                    reason, tracker.num_prompt_tokens, sum(tracker.tokens.values()),
                    n=tracker.n, max_tokens=tracker.max_tokens))
        return scheduler_stats(stats), it

    def _deltas(self, stats: EngineStats) -> IterationStats:
        prev = self._prev
        self._prev = stats

        def delta(name: str) -> int:
            value = int(getattr(stats, name))
            return value - int(getattr(prev, name)) if prev is not None else value

        return IterationStats(
            num_prompt_tokens=delta("prompt_tokens"),
            num_generation_tokens=delta("generation_tokens"),
            num_preemptions=delta("num_preemptions"),
            prefix_cache_queries=delta("prefix_cache_queries"),
            prefix_cache_hits=delta("prefix_cache_hits"))

    def _follow(self, tracker: _Tracker, out: RequestOutput, it: IterationStats) -> None:
        tracker.num_prompt_tokens = len(out.prompt_token_ids)
        new = 0  # tokens each sample gained (samples advance together, one token a step)
        for sample in out.outputs:
            before = tracker.tokens.get(sample.index, 0)
            total = before + len(sample.token_ids) if tracker.kind == RequestOutputKind.DELTA \
                else len(sample.token_ids)
            tracker.tokens[sample.index] = total
            new = max(new, total - before)
        m = out.metrics
        if m is not None and new > 0 and m.last_token_time is not None:
            start = tracker.last_token_time
            gaps = new
            if not tracker.first_token_seen and m.first_token_time is not None:
                tracker.first_token_seen = True
                it.time_to_first_tokens.append(m.first_token_time - m.arrival_time)
                start, gaps = m.first_token_time, new - 1
            if start is not None and gaps > 0:
                # Only the span is known when several tokens arrive in one output (FINAL_ONLY).
                it.inter_token_latencies.extend([(m.last_token_time - start) / gaps] * gaps)
            tracker.last_token_time = m.last_token_time
        if out.finished:
            self._requests.pop(out.request_id, None)
            it.finished.append(_finished(tracker, out))


def _finished(tracker: _Tracker, out: RequestOutput) -> FinishedRequestStats:
    reasons = [o.finish_reason for o in sorted(out.outputs, key=lambda o: o.index)
               if o.finish_reason]
    generated = sum(tracker.tokens.values())
    stats = FinishedRequestStats(reasons[0] if reasons else "stop", tracker.num_prompt_tokens,
                                 generated, n=tracker.n, max_tokens=tracker.max_tokens)
    m = out.metrics
    return stats if m is None else _with_phases(stats, m, max(tracker.tokens.values(),
                                                              default=0))


def _with_phases(stats: FinishedRequestStats, m: RequestMetrics,
                 longest: int) -> FinishedRequestStats:
    """The request's phases from its timestamps (``longest``: its longest sample's tokens)."""
    def span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

    decode = span(m.first_token_time, m.last_token_time)
    return replace(
        stats, e2e_latency=(m.finished_time or time.monotonic()) - m.arrival_time,
        queue_time=span(m.arrival_time, m.first_scheduled_time),
        prefill_time=span(m.first_scheduled_time, m.first_token_time), decode_time=decode,
        inference_time=span(m.first_scheduled_time, m.last_token_time),
        time_per_output_token=decode / (longest - 1) if decode is not None and longest > 1
        else None)


def scheduler_stats(stats: EngineStats) -> SchedulerStats:
    return SchedulerStats(
        num_running_reqs=stats.num_running_reqs, num_waiting_reqs=stats.num_waiting_reqs,
        kv_cache_usage=stats.kv_cache_usage, num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_total_blocks)
