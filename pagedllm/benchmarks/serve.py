"""``pagedllm bench serve``: load-test an OpenAI-compatible server, report as vLLM's bench serve.

From Python::

    requests = sample_random_requests(tokenizer, 200, input_len=512, output_len=128)
    config = ServeConfig(base_url="http://127.0.0.1:8000", max_concurrency=16)
    metrics = asyncio.run(run_benchmark(requests, config))
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from pagedllm.benchmarks.datasets import DEFAULT_MM_BUCKETS, SampleRequest, build_requests
from pagedllm.benchmarks.request_client import (
    CLIENT_TIMEOUT,
    RequestInput,
    RequestResult,
    fetch_model_id,
    send_request,
)
from pagedllm.benchmarks.serve_metrics import (
    METRIC_NAMES,
    BenchmarkMetrics,
    calculate_metrics,
    format_report,
    parse_goodput,
)

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
CHAT_ENDPOINT = ENDPOINTS[1]


@dataclass(frozen=True)
class ServeConfig:
    """How to send a benchmark's requests (what to send is a list of ``SampleRequest``)."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model at /v1/models
    request_rate: float = math.inf  # requests/s; inf sends all at once
    burstiness: float = 1.0  # gamma shape of the arrival gaps; 1 is a Poisson process
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    num_warmups: int = 0
    seed: int = 0
    disable_tqdm: bool = False
    extra_body: dict[str, Any] | None = None  # merged into every request's JSON body

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("--request-rate and --burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def api_url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint


@dataclass
class BenchmarkRun:
    model: str
    results: list[RequestResult]
    duration: float  # seconds


def arrival_gaps(n: int, request_rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds to wait before each request: 0 at an infinite rate, else gamma-distributed gaps
    of mean 1/rate and shape ``burstiness`` (1: Poisson; <1 burstier; >1 more regular)."""
    if math.isinf(request_rate):
        return np.zeros(n)
    theta = 1.0 / (request_rate * burstiness)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=theta, size=n)
    gaps[0] = 0.0  # the first request starts the clock
    return gaps


async def run_requests(requests: Sequence[SampleRequest], config: ServeConfig) -> BenchmarkRun:
    """Probe with one request, warm up, then send all requests on the arrival schedule."""
    if not requests:
        raise ValueError("no requests to send")
    limit = config.max_concurrency or 0  # 0: no connection cap, so none waits in the pool
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
    async with aiohttp.ClientSession(connector=connector, timeout=CLIENT_TIMEOUT) as session:
        model = config.model or await fetch_model_id(session, config.base_url)
        inputs = [RequestInput(config.api_url, model, r.prompt, r.expected_output_len,
                               r.prompt_len, config.ignore_eos, config.temperature,
                               config.extra_body, r.images)
                  for r in requests]
        probe = await send_request(session, inputs[0])
        if not probe.success:
            raise RuntimeError(f"test request to {config.api_url} failed: {probe.error}")
        semaphore = asyncio.Semaphore(config.max_concurrency or len(inputs))

        async def limited(request: RequestInput) -> RequestResult:
            async with semaphore:
                return await send_request(session, request)

        if config.num_warmups > 0:
            logger.info("Warming up with %d requests", config.num_warmups)
            await asyncio.gather(*(limited(inputs[0]) for _ in range(config.num_warmups)))
        results, duration = await _dispatch(inputs, config, limited)
    return BenchmarkRun(model, results, duration)


async def _dispatch(inputs: list[RequestInput], config: ServeConfig,
                    send: Callable[[RequestInput], Awaitable[RequestResult]],
                    ) -> tuple[list[RequestResult], float]:
    gaps = arrival_gaps(len(inputs), config.request_rate, config.burstiness, config.seed)
    pbar = tqdm(total=len(inputs), disable=config.disable_tqdm, desc="bench serve")
    tasks: list[asyncio.Task[RequestResult]] = []
    start = due = time.perf_counter()
    for request, gap in zip(inputs, gaps.tolist(), strict=True):
        due += gap  # absolute schedule: sleeping late once does not delay every later request
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(request))
        task.add_done_callback(lambda _: pbar.update(1))
        tasks.append(task)
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    pbar.close()
    return results, duration


async def run_benchmark(requests: Sequence[SampleRequest], config: ServeConfig,
                        percentiles: Sequence[float] = (99.0,),
                        goodput: dict[str, float] | None = None) -> BenchmarkMetrics:
    """Run one benchmark and aggregate it (goodput SLOs in ms, keyed ttft/tpot/e2el)."""
    run = await run_requests(requests, config)
    return calculate_metrics(run.results, run.duration, percentiles, goodput)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="Save TTFT/ITL distributions and throughput over time.")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Every flag but --plot: what to send, how fast, and what to report (shared with sweep)."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="Server URL; overrides --host/--port.")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default=None, choices=ENDPOINTS,
                        help=f"Default: {CHAT_ENDPOINT} for random-mm (its images need it), "
                             f"else {ENDPOINTS[0]}.")
    server.add_argument("--model", default=None, help="Model name. Default: ask /v1/models.")
    server.add_argument("--tokenizer", default=None,
                        help="Model path for the tokenizer. Default: pagedllm's default model.")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", default="random",
                      choices=["random", "random-mm", "sharegpt", "custom"],
                      help="random token prompts (random-mm: with random images, chat endpoint "
                           "only), or a file (--dataset-path): sharegpt = ShareGPT JSON/JSONL, "
                           "custom = JSONL of {\"prompt\": ...}.")
    data.add_argument("--dataset-path", default=None)
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths uniform in [len*(1-r), len*(1+r)].")
    data.add_argument("--random-prefix-len", type=int, default=0,
                      help="Random tokens shared by every prompt, before its own.")
    data.add_argument("--random-mm-base-items-per-request", type=int, default=1,
                      help="random-mm: images per request (mean).")
    data.add_argument("--random-mm-num-mm-items-range-ratio", type=float, default=0.0,
                      help="random-mm: images per request uniform in [n*(1-r), n*(1+r)].")
    data.add_argument("--random-mm-bucket-config", default=DEFAULT_MM_BUCKETS,
                      help="random-mm: image sizes as a Python dict {(height, width, 1): "
                           "probability}, e.g. '{(224, 224, 1): 1.0}'.")
    data.add_argument("--sharegpt-output-len", type=int, default=None,
                      help="max_tokens for every file prompt (default: the record's answer).")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Requests/s (Poisson or gamma arrivals); inf sends all at once.")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="Gamma shape of arrival gaps: 1 Poisson, <1 burstier, >1 steadier.")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--ignore-eos", action="store_true")
    load.add_argument("--extra-body", type=json.loads, default=None, metavar="JSON",
                      help="JSON object merged into every request body (for servers that "
                           "lack ignore_eos: '{\"logit_bias\": {\"2\": -100}}').")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--disable-tqdm", action="store_true")
    out = parser.add_argument_group("report")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                     help=f"Comma-separated, of {','.join(METRIC_NAMES)}.")
    out.add_argument("--metric-percentiles", default="99", help="Comma-separated, e.g. 50,90,99.")
    out.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000.")
    out.add_argument("--save-result", action="store_true")
    out.add_argument("--result-dir", default=".")
    out.add_argument("--result-filename", default=None)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    images = args.dataset_name == "random-mm"
    endpoint = args.endpoint or (CHAT_ENDPOINT if images else ENDPOINTS[0])
    if images and endpoint != CHAT_ENDPOINT:
        raise ValueError(f"--dataset-name random-mm sends images, which only the chat endpoint "
                         f"takes: use --endpoint {CHAT_ENDPOINT} (its default), not {endpoint}")
    return ServeConfig(base_url, endpoint, args.model, args.request_rate, args.burstiness,
                       args.max_concurrency, args.ignore_eos, args.temperature, args.num_warmups,
                       args.seed, args.disable_tqdm, args.extra_body)


def parse_report_args(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """--percentile-metrics and --metric-percentiles, validated."""
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := [m for m in selected if m not in METRIC_NAMES]:
        raise ValueError(f"--percentile-metrics: unknown {unknown}; choose from {METRIC_NAMES}")
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    if any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles must be in [0, 100], got {percentiles}")
    return selected, percentiles


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        selected, percentiles = parse_report_args(args)
        goodput = parse_goodput(args.goodput)
        requests = build_requests(args)
    except (ValueError, OSError, ImportError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("Traffic request rate: %s, burstiness: %s, max concurrency: %s",
                config.request_rate, config.burstiness, config.max_concurrency)
    try:
        run = asyncio.run(run_requests(requests, config))
    except (RuntimeError, aiohttp.ClientError) as exc:
        logger.error("%s", exc)
        return 1
    metrics = calculate_metrics(run.results, run.duration, percentiles, goodput)
    print(format_report(metrics, selected, config.max_concurrency, config.request_rate))
    if args.save_result:
        save_result(args, config, run, metrics)
    if args.plot:
        from pagedllm.benchmarks.plots import plot_serve

        plot_serve(run.results, args.plot, title=f"{run.model} @ {_load_label(config)}")
        logger.info("Saved plot to %s", args.plot)
    return 0 if metrics.completed else 1


def _load_label(config: ServeConfig) -> str:
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    return f"{rate} req/s, max concurrency {config.max_concurrency or 'unlimited'}"


def save_result(args: argparse.Namespace, config: ServeConfig, run: BenchmarkRun,
                metrics: BenchmarkMetrics) -> Path:
    now = datetime.now()
    ok = [r for r in run.results if r.success]
    record: dict[str, Any] = {
        "date": now.strftime("%Y%m%d-%H%M%S"), "backend": "openai", "model_id": run.model,
        "tokenizer_id": args.tokenizer, "num_prompts": len(run.results),
        **asdict(replace(config, model=run.model)), **metrics.to_dict(),
        "input_lens": [r.prompt_tokens for r in ok], "output_lens": [r.output_tokens for r in ok],
        "ttfts": [r.ttft for r in ok], "itls": [r.itl for r in ok],
        "errors": [r.error for r in run.results if not r.success],
    }
    record["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    name = args.result_filename or _default_filename(config, run.model, record["date"])
    path = Path(args.result_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    logger.info("Saved result to %s", path)
    return path


def _default_filename(config: ServeConfig, model: str, date: str) -> str:
    concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
    model_name = Path(model.rstrip("/")).name or "model"
    return f"pagedllm-{config.request_rate}qps{concurrency}-{model_name}-{date}.json"
