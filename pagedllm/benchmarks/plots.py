"""Benchmark figures (matplotlib's object API: no pyplot global state, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pagedllm.benchmarks.request_client import RequestResult
from pagedllm.benchmarks.serve_metrics import BenchmarkMetrics, output_timeline


def _hist_and_cdf(hist: Axes, cdf: Axes, values_ms: np.ndarray, name: str) -> None:
    if values_ms.size == 0:
        for ax in (hist, cdf):
            ax.text(0.5, 0.5, f"no {name} data", ha="center", va="center",
                    transform=ax.transAxes)
        return
    hist.hist(values_ms, bins=min(50, max(10, values_ms.size // 5)), color="tab:blue",
              alpha=0.8)
    for q, style in ((50, "--"), (99, ":")):
        hist.axvline(float(np.percentile(values_ms, q)), color="k", linestyle=style,
                     label=f"p{q} {np.percentile(values_ms, q):.1f} ms")
    hist.set(title=f"{name} histogram", xlabel=f"{name} (ms)", ylabel="count")
    hist.legend(fontsize="small")
    ordered = np.sort(values_ms)
    cdf.step(ordered, np.arange(1, ordered.size + 1) / ordered.size, where="post",
             color="tab:orange")
    cdf.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction of samples",
            ylim=(0, 1.01))
    cdf.grid(alpha=0.3)


def _concurrency_steps(results: Sequence[RequestResult]) -> tuple[np.ndarray, np.ndarray]:
    """(event times from the first start in s, requests in flight from each event on)."""
    ok = [r for r in results if r.success]
    t0 = min(r.start_time for r in ok)
    events = sorted([(r.start_time - t0, 1) for r in ok]
                    + [(r.start_time + r.latency - t0, -1) for r in ok])
    times = np.array([t for t, _ in events])
    return times, np.cumsum([step for _, step in events])


def plot_serve(results: Sequence[RequestResult], path: str | Path, title: str = "") -> None:
    """TTFT and ITL histograms and CDFs, and output throughput (with concurrency) over time."""
    ok = [r for r in results if r.success]
    fig = Figure(figsize=(13, 11), layout="constrained")
    grid = fig.add_gridspec(3, 2)
    ttft_ms = np.array([r.ttft for r in ok]) * 1000.0
    itl_ms = np.array([gap for r in ok for gap in r.itl]) * 1000.0
    _hist_and_cdf(fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), ttft_ms, "TTFT")
    _hist_and_cdf(fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1]), itl_ms, "ITL")
    ax = fig.add_subplot(grid[2, :])
    starts, tokens_per_s = output_timeline(ok)
    if starts.size:
        ax.stairs(tokens_per_s, np.append(starts, starts[-1] + 1.0), color="tab:green",
                  label="output tok/s")
        twin = ax.twinx()
        times, in_flight = _concurrency_steps(ok)
        twin.step(times, in_flight, where="post", color="tab:gray", alpha=0.6,
                  label="requests in flight")
        twin.set_ylabel("requests in flight")
        twin.legend(loc="upper right", fontsize="small")
    ax.set(title="Output token throughput over time (1 s buckets)", xlabel="time (s)",
           ylabel="output tokens/s")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    fig.suptitle(title or "bench serve")
    fig.savefig(path, dpi=100)


def plot_sweep(points: Sequence[tuple[str, BenchmarkMetrics]], path: str | Path,
               title: str = "", percentile: float = 99.0) -> None:
    """Output throughput vs median and p99 TTFT / TPOT, one labelled point per setting."""
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    axes = fig.subplots(1, 2)
    throughput = [m.output_throughput for _, m in points]
    for ax, name in zip(axes, ("ttft", "tpot"), strict=True):
        median = [getattr(m, name).median for _, m in points]
        tail = [getattr(m, name).percentiles.get(percentile, np.nan) for _, m in points]
        p = int(percentile) if float(percentile).is_integer() else percentile
        ax.plot(throughput, median, "o-", color="tab:blue", label=f"median {name.upper()}")
        ax.plot(throughput, tail, "s--", color="tab:red", label=f"p{p} {name.upper()}")
        for (label, _), x, y in zip(points, throughput, median, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6),
                        fontsize="small")
        ax.set(xlabel="output throughput (tokens/s)", ylabel=f"{name.upper()} (ms)",
               title=f"{name.upper()} vs output throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or "bench sweep")
    fig.savefig(path, dpi=100)
