"""The periodic log line (vLLM's), every ``interval`` seconds while the engine is busy."""

from __future__ import annotations

import logging
import time

from pagedllm.metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger("pagedllm.metrics")


class LoggingStatLogger:
    """Accumulates tokens between log lines; ``maybe_log`` prints when ``interval`` has passed.

    A line is printed only when something happened since the last one (tokens, requests in the
    system), so an idle server stays quiet.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last_time = time.monotonic()
        self._last: SchedulerStats = SchedulerStats()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._preemptions = 0
        self._queries = 0
        self._hits = 0
        self._total_queries = 0
        self._total_hits = 0
        self._active = False

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self._last = scheduler
        self._prompt_tokens += iteration.num_prompt_tokens
        self._generation_tokens += iteration.num_generation_tokens
        self._preemptions += iteration.num_preemptions
        self._queries += iteration.prefix_cache_queries
        self._hits += iteration.prefix_cache_hits
        self._total_queries += iteration.prefix_cache_queries
        self._total_hits += iteration.prefix_cache_hits
        self._active = self._active or iteration.step_num_reqs is not None \
            or bool(iteration.finished)

    @property
    def pending(self) -> bool:
        """Whether a line is due once the interval ends (the engine loop waits that long)."""
        return self._active or self._last.num_running_reqs > 0 \
            or self._last.num_waiting_reqs > 0

    def seconds_to_next(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_time + self.interval - now)

    def maybe_log(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = now - self._last_time
        if elapsed < self.interval:
            return
        if self.pending:
            logger.info(self.line(elapsed))
        self.start_interval(now)

    def line(self, elapsed: float) -> str:
        s = self._last
        queries, hits = self._queries, self._hits
        if queries == 0:  # nothing looked up this interval: show the lifetime rate
            queries, hits = self._total_queries, self._total_hits
        hit_rate = 100.0 * hits / queries if queries else 0.0
        return (f"Avg prompt throughput: {self._prompt_tokens / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {self._generation_tokens / elapsed:.1f} tokens/s, "
                f"Running: {s.num_running_reqs} reqs, Waiting: {s.num_waiting_reqs} reqs, "
                f"Preemptions: {self._preemptions}, "
                # vLLM's line says "GPU KV cache usage"; the cache may be on the CPU here
                f"KV cache usage: {100.0 * s.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {hit_rate:.1f}%")

    def start_interval(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_time = now
        self._prompt_tokens = self._generation_tokens = self._preemptions = 0
        self._queries = self._hits = 0
        self._active = False
