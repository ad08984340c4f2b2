"""The server's periodic stats line (pagedllm/metrics/loggers.py) names no device it may not use."""

from __future__ import annotations

from pagedllm.metrics.loggers import LoggingStatLogger
from pagedllm.metrics.stats import IterationStats, SchedulerStats


def test_stats_line_says_kv_cache_usage_without_gpu() -> None:
    logger = LoggingStatLogger(interval=10.0)
    logger.record(SchedulerStats(num_running_reqs=2, kv_cache_usage=0.25), IterationStats())
    line = logger.line(elapsed=10.0)
    assert "KV cache usage: 25.0%" in line and "GPU" not in line
    assert "Running: 2 reqs" in line
