"""Per-request results -> ``BenchmarkMetrics`` (vLLM's bench serve definitions) and its report.

- TTFT, E2EL: per successful request.
- TPOT: (e2el - ttft) / (output_tokens - 1), over requests with more than one output token.
- ITL: every gap between text chunks of every successful request, pooled.
- Throughputs divide by the benchmark's wall-clock duration; goodput counts requests that meet
  every SLO given (TPOT 0 for a one-token answer).
- Peak output throughput: output tokens in the busiest 1-second window from the first request's
  start. vLLM counts one token per chunk; here each chunk carries its request's output_tokens /
  chunks, which is the same when the server streams a token per chunk.
- Peak concurrency: the most requests in flight at one instant (vLLM counts per 1-second bucket,
  which over-counts requests that merely share a second).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pagedllm.benchmarks.request_client import RequestResult

logger = logging.getLogger(__name__)

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


@dataclass(frozen=True)
class LatencyStats:
    """One latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]  # {99.0: p99}


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration: float  # seconds, first request sent -> last response done
    total_input: int  # prompt tokens, from the server's usage
    total_output: int  # completion tokens, from the server's usage
    request_throughput: float  # completed requests / s
    request_goodput: float | None  # requests meeting every SLO / s; None without --goodput
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output tokens) / s
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    usage_missing: int = 0  # successful requests whose token counts are estimates

    def to_dict(self) -> dict[str, Any]:
        """Flat, vLLM-named keys (``mean_ttft_ms``, ``p99_itl_ms``, ...) for JSON results."""
        out = {k: v for k, v in asdict(self).items() if k not in METRIC_NAMES}
        out["total_input_tokens"] = out.pop("total_input")
        out["total_output_tokens"] = out.pop("total_output")
        for name in METRIC_NAMES:
            stats: LatencyStats = getattr(self, name)
            out[f"mean_{name}_ms"] = stats.mean
            out[f"median_{name}_ms"] = stats.median
            out[f"std_{name}_ms"] = stats.std
            for p, value in stats.percentiles.items():
                out[f"p{percentile_label(p)}_{name}_ms"] = value
        return out


def percentile_label(p: float) -> str:
    """99.0 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if float(p).is_integer() else str(p)


def latency_stats(seconds: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:  # no data (e.g. every answer one token long): zeros, as vLLM reports
        return LatencyStats(0.0, 0.0, 0.0, {float(p): 0.0 for p in percentiles})
    return LatencyStats(float(ms.mean()), float(np.median(ms)), float(ms.std()),
                        {float(p): float(np.percentile(ms, p)) for p in percentiles})


def tpot_of(result: RequestResult) -> float | None:
    if result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def calculate_metrics(results: Sequence[RequestResult], duration: float,
                      percentiles: Sequence[float] = (99.0,),
                      goodput: dict[str, float] | None = None) -> BenchmarkMetrics:
    """Aggregate one benchmark run; ``goodput`` maps ttft/tpot/e2el to SLOs in ms."""
    ok = [r for r in results if r.success]
    if not ok:
        logger.warning("All %d requests failed; first error: %s", len(results),
                       results[0].error if results else "no requests")
    tpots = [t for r in ok if (t := tpot_of(r)) is not None]
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    usage_missing = sum(not r.usage_reported for r in ok)
    if usage_missing:
        logger.warning("%d requests had no usage chunk: their token counts are estimates",
                       usage_missing)
    per_s = 1.0 / duration if duration > 0 else 0.0
    good = None if not goodput else _count_good(ok, goodput) * per_s
    _, tokens_per_s = output_timeline(ok)
    return BenchmarkMetrics(
        completed=len(ok), failed=len(results) - len(ok), duration=duration,
        total_input=total_input, total_output=total_output,
        request_throughput=len(ok) * per_s, request_goodput=good,
        output_throughput=total_output * per_s,
        total_token_throughput=(total_input + total_output) * per_s,
        max_output_tokens_per_s=float(tokens_per_s.max()) if tokens_per_s.size else 0.0,
        max_concurrent_requests=peak_concurrency(ok),
        ttft=latency_stats([r.ttft for r in ok], percentiles),
        tpot=latency_stats(tpots, percentiles),
        itl=latency_stats([gap for r in ok for gap in r.itl], percentiles),
        e2el=latency_stats([r.latency for r in ok], percentiles),
        usage_missing=usage_missing)


def _count_good(ok: Sequence[RequestResult], slos_ms: dict[str, float]) -> int:
    good = 0
    for r in ok:
        values = {"ttft": r.ttft, "tpot": tpot_of(r) or 0.0, "e2el": r.latency}
        good += all(values[k] * 1000.0 <= slo for k, slo in slos_ms.items())
    return good


def output_timeline(results: Sequence[RequestResult],
                    bucket_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bucket start times from the first request's start in s, output tokens/s per bucket)."""
    ok = [r for r in results if r.success]
    if not ok:
        return np.zeros(0), np.zeros(0)
    t0 = min(r.start_time for r in ok)
    end = max(r.start_time + r.latency for r in ok)
    counts = np.zeros(int(math.floor((end - t0) / bucket_s)) + 1)
    for r in ok:
        times = np.asarray(r.token_times()) - t0
        # A chunk carries its share of the request's tokens (exactly one when streamed per token).
        weight = r.output_tokens / len(times)
        np.add.at(counts, np.minimum((times / bucket_s).astype(int), len(counts) - 1), weight)
    return np.arange(len(counts)) * bucket_s, counts / bucket_s


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most successful requests in flight at one instant (a finish before a start at a tie)."""
    events = sorted([(r.start_time, 1) for r in results if r.success]
                    + [(r.start_time + r.latency, -1) for r in results if r.success])
    peak = in_flight = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    return peak


def parse_goodput(items: Sequence[str] | None) -> dict[str, float] | None:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    if not items:
        return None
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[key] = float(value)
        if slos[key] < 0:
            raise ValueError(f"--goodput SLOs must be >= 0 ms, got {item!r}")
    return slos


def format_report(m: BenchmarkMetrics, selected: Sequence[str] = ("ttft", "tpot", "itl"),
                  max_concurrency: int | None = None, request_rate: float = math.inf) -> str:
    """The ``Serving Benchmark Result`` table, vLLM's layout."""
    rows: list[str] = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: float | int | str, fmt: str = "") -> None:
        rows.append(f"{label:<40} {format(value, fmt):<10}")

    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    row("Request rate configured (RPS):", request_rate, ".2f")
    row("Benchmark duration (s):", m.duration, ".2f")
    row("Total input tokens:", m.total_input)
    row("Total generated tokens:", m.total_output)
    row("Request throughput (req/s):", m.request_throughput, ".2f")
    if m.request_goodput is not None:
        row("Request goodput (req/s):", m.request_goodput, ".2f")
    row("Output token throughput (tok/s):", m.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", m.max_concurrent_requests)
    row("Total token throughput (tok/s):", m.total_token_throughput, ".2f")
    for name in selected:
        stats: LatencyStats = getattr(m, name)
        rows.append("{s:{c}^{n}}".format(s=_TITLES[name], n=50, c="-"))
        row(f"Mean {_LABELS[name]} (ms):", stats.mean, ".2f")
        row(f"Median {_LABELS[name]} (ms):", stats.median, ".2f")
        for p, value in stats.percentiles.items():
            row(f"P{percentile_label(p)} {_LABELS[name]} (ms):", value, ".2f")
    rows.append("=" * 50)
    return "\n".join(rows)
