"""``pagedllm bench sweep``: bench serve at several concurrencies or request rates.

The same prompts are sent at every setting, so the points differ only in load. The figure (output
throughput against median / p99 TTFT and TPOT) shows where more concurrency stops buying
throughput and starts costing latency: the usual way to pick ``--max-num-seqs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from pagedllm.benchmarks.datasets import SampleRequest, build_requests
from pagedllm.benchmarks.serve import (
    ServeConfig,
    add_load_args,
    config_from_args,
    parse_report_args,
    run_requests,
)
from pagedllm.benchmarks.serve_metrics import BenchmarkMetrics, calculate_metrics, parse_goodput

logger = logging.getLogger(__name__)

TAIL = 99.0  # the tail percentile the table and the figure show


@dataclass(frozen=True)
class SweepPoint:
    label: str  # "c=8" or "r=4"
    config: ServeConfig
    metrics: BenchmarkMetrics

    def to_dict(self) -> dict[str, Any]:
        rate = self.config.request_rate
        return {"label": self.label, "max_concurrency": self.config.max_concurrency,
                "request_rate": "inf" if math.isinf(rate) else rate, **self.metrics.to_dict()}


def parse_values(text: str, kind: type[int] | type[float]) -> list[Any]:
    """"1,2,4" -> [1, 2, 4]; for rates "inf" is allowed."""
    values = [kind(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def sweep_configs(base: ServeConfig, concurrencies: Sequence[int] | None,
                  request_rates: Sequence[float] | None) -> list[tuple[str, ServeConfig]]:
    if concurrencies:
        return [(f"c={c}", replace(base, max_concurrency=c)) for c in concurrencies]
    if request_rates:
        return [(f"r={r:g}", replace(base, request_rate=r)) for r in request_rates]
    raise ValueError("bench sweep needs --concurrencies or --request-rates")


async def run_sweep(requests: Sequence[SampleRequest], settings: Sequence[tuple[str, ServeConfig]],
                    percentiles: Sequence[float] = (TAIL,),
                    goodput: dict[str, float] | None = None) -> list[SweepPoint]:
    """One benchmark per setting, in order; a setting whose probe request fails is skipped."""
    points: list[SweepPoint] = []
    model: str | None = None
    for label, config in settings:
        config = replace(config, model=config.model or model)
        try:
            run = await run_requests(requests, config)
        except (RuntimeError, aiohttp.ClientError) as exc:
            logger.error("%s: %s; skipping this setting", label, exc)
            continue
        model = run.model
        metrics = calculate_metrics(run.results, run.duration, percentiles, goodput)
        logger.info("%s: %.1f output tok/s, median TTFT %.1f ms, median TPOT %.2f ms, %d failed",
                    label, metrics.output_throughput, metrics.ttft.median, metrics.tpot.median,
                    metrics.failed)
        points.append(SweepPoint(label, replace(config, model=model), metrics))
    return points


def format_table(points: Sequence[SweepPoint]) -> str:
    tail = f"p{int(TAIL)}"
    header = (f"{'setting':>10} {'ok':>6} {'fail':>5} {'req/s':>8} {'out tok/s':>10} "
              f"{'peak conc':>9} {'TTFT med':>9} {'TTFT ' + tail:>9} {'TPOT med':>9} "
              f"{'TPOT ' + tail:>9} {'ITL med':>8}")
    lines = [header, "-" * len(header)]
    for p in points:
        m = p.metrics
        lines.append(
            f"{p.label:>10} {m.completed:>6} {m.failed:>5} {m.request_throughput:>8.2f} "
            f"{m.output_throughput:>10.1f} {m.max_concurrent_requests:>9} "
            f"{m.ttft.median:>9.1f} {m.ttft.percentiles.get(TAIL, math.nan):>9.1f} "
            f"{m.tpot.median:>9.2f} {m.tpot.percentiles.get(TAIL, math.nan):>9.2f} "
            f"{m.itl.median:>8.2f}")
    return "\n".join(lines) + "\n(latencies in ms)"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    sweep = parser.add_argument_group("sweep")
    which = sweep.add_mutually_exclusive_group(required=True)
    which.add_argument("--concurrencies", default=None,
                       help="Comma-separated --max-concurrency values, e.g. 1,2,4,8,16,32.")
    which.add_argument("--request-rates", default=None,
                       help="Comma-separated --request-rate values (req/s), e.g. 1,2,4,8,inf.")
    sweep.add_argument("--plot", default=None, metavar="FILE.png",
                       help="Save throughput-vs-latency curves (TTFT and TPOT).")


def main(args: argparse.Namespace) -> int:
    try:
        base = config_from_args(args)
        _, percentiles = parse_report_args(args)
        percentiles = sorted(set(percentiles) | {TAIL})
        goodput = parse_goodput(args.goodput)
        settings = sweep_configs(
            base,
            parse_values(args.concurrencies, int) if args.concurrencies else None,
            parse_values(args.request_rates, float) if args.request_rates else None)
        requests = build_requests(args)
    except (ValueError, OSError, ImportError) as exc:
        logger.error("%s", exc)
        return 2
    points = asyncio.run(run_sweep(requests, settings, percentiles, goodput))
    if not points:
        logger.error("every setting failed")
        return 1
    print(format_table(points))
    if args.save_result:
        save_sweep(args, points)
    if args.plot:
        from pagedllm.benchmarks.plots import plot_sweep

        model = points[0].config.model or ""
        plot_sweep([(p.label, p.metrics) for p in points], args.plot,
                   title=f"{model}: {len(requests)} prompts per setting", percentile=TAIL)
        logger.info("Saved plot to %s", args.plot)
    return 0


def save_sweep(args: argparse.Namespace, points: Sequence[SweepPoint]) -> Path:
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"date": date, "model_id": points[0].config.model, "tokenizer_id": args.tokenizer,
              "num_prompts": args.num_prompts, "dataset_name": args.dataset_name,
              "points": [p.to_dict() for p in points]}
    path = Path(args.result_dir) / (args.result_filename or f"pagedllm-sweep-{date}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    logger.info("Saved sweep result to %s", path)
    return path
