"""``pagedllm bench throughput``: one offline workload through ``LLM.generate`` (and, with
``--compare-transformers``, through transformers' batched ``generate``), reporting output tokens/s
and time to first token (TTFT).

Workloads (random token ids, ``ignore_eos``, so every request produces exactly its output length):
- ``random``: ``--num-prompts`` prompts of ``--input-len`` x [1 - ratio, 1 + ratio] tokens and
  ``--output-len`` x [1 - output ratio, 1 + output ratio] outputs (defaults: 63-512, 63-128);
- ``nano-vllm``: nano-vllm's bench, 256 sequences with input and output lengths uniform in
  [100, 1024];
- ``shared-prefix``: ``--num-prompts`` requests that share a ``--prefix-len``-token system prompt,
  run with prefix caching on and then off, reporting prompt tokens computed and throughput;
- ``random-mm``: ``--num-prompts`` prompts of ``--images-per-prompt`` random-noise images of
  ``--image-size``, each in the model's ``<|vision_start|><|image_pad|><|vision_end|>``, then
  exactly ``--input-len`` random text tokens; exactly ``--output-len`` outputs. Token ids, so a
  config-only folder (``--load-format dummy``) works. transformers gets the same pixels, from
  pagedllm's processor (equal to ``Qwen2VLImageProcessorPil``'s), with each ``<|image_pad|>``
  expanded to its image's token count, and ``mm_token_type_ids`` where its model takes them.

Timing: throughput is the wall time of the whole batch, image preprocessing included on both
sides. TTFT leaves preprocessing out on both sides. pagedllm's comes from each request's metrics
(arrival, once its images are processed, to its first token): "TTFT ms" is the median over the
measured batch (queued all at once, so it grows with the batch) and "TTFT b1 ms" the median of
``TTFT_RUNS`` prompts run alone. transformers' "TTFT b1 ms" is the median time of
``generate(max_new_tokens=1)`` on one prompt. Warm-up and batch-1 prompts are drawn with another
seed: they leave the measured batch no prefix-cache or image hits.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from pagedllm.benchmarks.hf_reference import (
    load_transformers_model,
    run_transformers,
    transformers_ttft,
)
from pagedllm.benchmarks.workloads import (
    RunResult,
    Workload,
    image_placeholder,
    make_workload,
    parse_image_size,
    probe_workload,
)
from pagedllm.config import add_engine_args, engine_kwargs_from_args

if TYPE_CHECKING:
    from pagedllm.multimodal.image_processor import ImageProcessorConfig

logger = logging.getLogger(__name__)


def run_pagedllm(llm, workload: Workload, name: str = "pagedllm") -> RunResult:  # noqa: ANN001
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in workload.output_lens]
    before = llm.engine.get_stats().prompt_tokens
    start = time.perf_counter()
    outputs = llm.generate(workload.engine_prompts(), params)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, (produced, workload.num_output_tokens)
    ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs
             if o.metrics is not None and o.metrics.first_token_time is not None]
    return RunResult(name, seconds, produced, llm.engine.get_stats().prompt_tokens - before,
                     ttft_ms=1000 * statistics.median(ttfts) if ttfts else None)


def pagedllm_ttft(llm, probes: Workload) -> float:  # noqa: ANN001
    """Median TTFT (ms) of the probes, each run alone."""
    runs = [run_pagedllm(llm, probes.select([i]), "batch-1 TTFT")
            for i in range(len(probes.prompts))]
    return statistics.median(r.ttft_ms for r in runs if r.ttft_ms is not None)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="random",
                        choices=["random", "nano-vllm", "shared-prefix", "random-mm"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=288,
                        help="Mean prompt length (random-mm: exact text tokens after the images).")
    parser.add_argument("--output-len", type=int, default=96,
                        help="Mean output length (random-mm: exact).")
    parser.add_argument("--range-ratio", type=float, default=0.78,
                        help="Prompt lengths are uniform in mean x [1 - ratio, 1 + ratio].")
    parser.add_argument("--output-range-ratio", type=float, default=0.34,
                        help="Output lengths are uniform in mean x [1 - ratio, 1 + ratio].")
    parser.add_argument("--prefix-len", type=int, default=400,
                        help="Shared prefix length (shared-prefix workload).")
    parser.add_argument("--image-size", type=parse_image_size, default=(224, 224),
                        metavar="WxH", help="Size of every image (random-mm workload).")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="Images in every prompt (random-mm workload).")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="Also run transformers' batched generate on the same work.")
    parser.add_argument("--hf-batch-sizes", default="16,64",
                        help="Batch sizes tried for transformers; the best counts.")
    parser.add_argument("--batch1-tokens", type=int, default=0,
                        help="Also time batch-1 decode of this many tokens (both engines).")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--workload-seed", type=int, default=0)
    add_engine_args(parser)


def main(args: argparse.Namespace) -> int:
    from pagedllm import LLM

    kwargs = engine_kwargs_from_args(args)
    model = kwargs.get("model")
    try:
        placeholder = image_placeholder(args, model)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    llm = LLM(**kwargs)
    vocab_size = llm.engine.vocab_size
    workload = make_workload(args, vocab_size, placeholder)
    warmup, ttft_probes = probe_workload(args, vocab_size, placeholder)
    logger.info("workload %s: %d requests, %d prompt tokens (images as one each), %d images, "
                "%d output tokens", args.workload, len(workload.prompts),
                sum(map(len, workload.prompts)), sum(map(len, workload.images or [])),
                workload.num_output_tokens)
    run_pagedllm(llm, warmup, "warm-up")
    results = [run_pagedllm(llm, workload)]
    results[0].ttft_batch1_ms = pagedllm_ttft(llm, ttft_probes)
    if args.workload == "shared-prefix":
        off = LLM(**{**kwargs, "enable_prefix_caching": False})
        run_pagedllm(off, warmup, "warm-up")
        results[0].name = "pagedllm (prefix caching on)"
        results.append(run_pagedllm(off, workload, "pagedllm (prefix caching off)"))
    hf_model = None
    image_config = llm.engine.input_processor.image_config
    if args.compare_transformers:
        runner = llm.engine.core.runner
        hf_model = load_transformers_model(model, args.load_format, runner.dtype, runner.device)
        results += compare_transformers(hf_model, workload, (warmup, ttft_probes),
                                        [int(b) for b in args.hf_batch_sizes.split(",")],
                                        image_config)
    if args.batch1_tokens:
        results += batch1_decode(llm, hf_model, workload, args.batch1_tokens, image_config)
    _report(results, args.output_json)
    return 0


def compare_transformers(model, workload: Workload,  # noqa: ANN001
                         probes: tuple[Workload, Workload], batch_sizes: list[int],
                         image_config: ImageProcessorConfig | None = None) -> list[RunResult]:
    """transformers on the workload at each batch size, the best first (with its batch-1 TTFT
    on the probes: (warm-up, TTFT))."""
    warmup, ttft_probes = probes
    run_transformers(model, warmup, len(warmup.prompts), image_config)
    runs = sorted((run_transformers(model, workload, b, image_config) for b in batch_sizes),
                  key=lambda r: -r.output_tokens_per_s)
    runs[0].ttft_batch1_ms = transformers_ttft(model, ttft_probes, image_config)
    return runs


def batch1_decode(llm, hf_model, workload: Workload, num_tokens: int,  # noqa: ANN001
                  image_config: ImageProcessorConfig | None = None) -> list[RunResult]:
    """Decode of one request alone, by pagedllm and (if given) transformers."""
    one = workload.select([0], num_tokens)
    results = [run_pagedllm(llm, one, "pagedllm batch-1")]
    if hf_model is not None:
        r = run_transformers(hf_model, one, 1, image_config)
        r.name = "transformers batch-1"
        results.append(r)
    return results


def _report(results: list[RunResult], path: str | None) -> None:
    base = results[0].output_tokens_per_s
    lines = [f"{'run':<36} {'seconds':>8} {'out tok':>8} {'out tok/s':>10} {'ratio':>6} "
             f"{'prompt tok computed':>19} {'TTFT ms':>9} {'TTFT b1 ms':>10}"]
    for r in results:
        lines.append(f"{r.name:<36} {r.seconds:>8.2f} {r.output_tokens:>8} "
                     f"{r.output_tokens_per_s:>10.1f} {base / r.output_tokens_per_s:>6.2f} "
                     f"{_blank(r.prompt_tokens_computed, 'd'):>19} {_blank(r.ttft_ms):>9} "
                     f"{_blank(r.ttft_batch1_ms):>10}")
    print("\n".join(lines))  # the report is the command's output
    if path:
        with open(path, "w") as f:
            json.dump([asdict(r) | {"output_tokens_per_s": r.output_tokens_per_s}
                       for r in results], f, indent=2)


def _blank(value: float | None, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)
