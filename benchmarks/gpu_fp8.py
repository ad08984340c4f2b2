"""FP8 on the GPU (issue 16): kernel tests, accuracy against bf16, speed. Run on an H200:

    python benchmarks/gpu_fp8.py [--quick] [--skip-tests] [--only SECTION ...] [--repeat N]

1. The FP8 kernel tests (and the kernels they touch) on CUDA, against the CPU reference.
2. Accuracy on the Llama-3.1-8B shape with random weights (the same weights in every run:
   ``--load-format dummy`` with one seed; only the FP8 steps differ): bf16 against
   ``--quantization fp8`` and against ``--kv-cache-dtype fp8``. Each scores the bf16 run's
   greedy continuations (32 tokens after each prompt) by teacher forcing, so the logprobs of
   the same tokens are compared (mean and max absolute difference), and runs its own greedy
   decoding, whose tokens are compared with bf16's position by position over the first 32.
3. Speed, with gpu_bench's workloads and functions: the 8B batch-1 decode step against its
   bandwidth floor and the 500-request throughput, bf16 and fp8 weights (and fp8 KV); the fp8
   batch-1 step once more with decodes through torch._scaled_mm instead of the weight-only
   kernel (``fp8.SMALL_M = 0``), to check the engine's choice.
4. nano-vllm's workload on the Qwen3-0.6B shape with bf16 and fp8 KV, and the KV cache tokens
   each start-up logs.

``--only`` runs some sections: tests, 8b (2 and 3), scaled-mm, qwen-kv (4), 8b-throughput (bf16
and fp8 weights, throughput only), profile-b1 (the fp8 8B batch-1 step under the profilers).
``--repeat N`` runs qwen-kv's and 8b-throughput's engines N times each, alternating the
variants, and adds each variant's median (engines of one session differ by up to 30 %).
8b-rounds runs the bf16 and fp8-weight engines each in a process of its own, alternating N
times (``--repeat``); each process runs three 500-request workloads of their own seeds and
keeps the last two (``separate_engines``).

A short table comes last. Engine logs go to stderr at WARNING, the table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import re
import statistics
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import (  # noqa: E402
    GpuSpans,
    Row,
    batch1_row,
    batch1_step_ms,
    copy_bandwidth,
    make_llm,
    nano_vllm_workload,
    profile_decode,
    release,
    sharegpt_like_workload,
    throughput_row,
)

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.benchmarks.throughput import Workload, run_pagedllm  # noqa: E402
from pagedllm.layers.quantization import fp8  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The FP8 tests, and the bf16 cases of the two kernels the FP8 cache changed (a subset: each
# case compiles its own variant).
TESTS = ["tests/kernels/test_fp8_quant.py", "tests/kernels/test_fp8_gemm.py",
         "tests/kernels/test_fp8_kv_cache.py", "tests/kernels/test_kv_cache_write.py",
         "tests/kernels/test_paged_attention.py::test_backend_writes_and_attends",
         "tests/kernels/test_paged_attention.py::test_padded_decode_step_without_tile_map",
         "tests/kernels/test_fp8_epilogue.py", "tests/quantization/test_fp8_linear.py",
         "tests/gpu/test_gpu_fp8.py"]
TESTS_TIMEOUT_S = 240
POSITIONS = 32  # greedy positions compared
VARIANTS = {"bf16": {}, "fp8 weights": {"quantization": "fp8"},
            "fp8 KV cache": {"kv_cache_dtype": "fp8"}}


def run_tests() -> str:
    """pytest of the FP8 kernels on CUDA (in parallel where pytest-xdist is installed)."""
    xdist = ["-n", "8"] if _has_module("xdist") else []
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *xdist, *TESTS], cwd=REPO, capture_output=True, text=True,
                              timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"FAILED: over {TESTS_TIMEOUT_S} s"
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    return f"{'passed' if proc.returncode == 0 else 'FAILED'}: {summary}"


def _has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def accuracy_prompts(n: int, seed: int = 7, vocab: int = 10000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(64, 192))] for _ in range(n)]


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=POSITIONS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def teacher_forced(llm: LLM, prompts: list[list[int]],
                   continuations: list[list[int]]) -> torch.Tensor:
    """[n, POSITIONS] logprobs of each continuation's tokens after its prompt."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    full = [p + c for p, c in zip(prompts, continuations)]
    outs = llm.generate(full, params, use_tqdm=False)
    return torch.tensor([[lp[t].logprob for lp, t in zip(o.prompt_logprobs[len(p):], c)]
                         for o, p, c in zip(outs, prompts, continuations)])


@dataclass
class Accuracy:
    variant: str
    mean_abs: float  # |logprob - bf16 logprob| of bf16's greedy tokens, mean over all
    max_abs: float
    agreement: float  # fraction of the first POSITIONS greedy tokens equal to bf16's
    common_prefix: float  # mean number of leading greedy tokens equal to bf16's

    def line(self) -> str:
        return (f"{self.variant:<16} {self.mean_abs:12.4f} {self.max_abs:12.4f} "
                f"{100 * self.agreement:11.1f}% {self.common_prefix:14.1f}")


def compare(variant: str, ref_scores: torch.Tensor, scores: torch.Tensor,
            ref_tokens: list[list[int]], tokens: list[list[int]]) -> Accuracy:
    diff = (scores - ref_scores).abs()
    same = torch.tensor([[a == b for a, b in zip(r, t)] for r, t in zip(ref_tokens, tokens)])
    prefix = same.int().cumprod(dim=1).sum(dim=1).float()
    return Accuracy(variant, diff.mean().item(), diff.max().item(), same.float().mean().item(),
                    prefix.mean().item())


class KVTokens(logging.Handler):
    """The tokens of the start-up log's 'KV cache size: N tokens' line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.tokens = 0

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"KV cache size: ([\d,]+) tokens", record.getMessage())
        if found:
            self.tokens = int(found.group(1).replace(",", ""))


def kv_tokens_logged(build):  # noqa: ANN001, ANN201
    """Runs ``build()`` and returns (its result, the KV tokens its start-up logged)."""
    handler = KVTokens()
    logger = logging.getLogger("pagedllm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return build(), handler.tokens
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def failed(name: str) -> Row:
    """A section that raised: its traceback to stderr, one row in the table, and the run goes
    on (one GPU session has to show everything that works)."""
    traceback.print_exc()
    error = traceback.format_exception_only(*sys.exc_info()[:2])[-1].strip()
    return Row(f"{name}: FAILED", 0.0, "", target=error[:120])


def llama_8b(bw: float, n_requests: int, n_prompts: int) -> tuple[list[Row], list[Accuracy]]:
    """Per variant: one engine for the throughput run, the batch-1 step and the accuracy."""
    rows, accuracy = [], []
    prompts = accuracy_prompts(n_prompts)
    workload = sharegpt_like_workload(n_requests)
    ref: dict[str, Any] = {}
    for variant, args in VARIANTS.items():
        try:
            llama_8b_variant(variant, args, bw, workload, prompts, ref, rows, accuracy)
        except Exception:  # noqa: BLE001 - reported in the table
            rows.append(failed(f"8b {variant}"))
        gc.collect()  # a failed variant's engine goes with its traceback
        torch.cuda.empty_cache()
    return rows, accuracy


def llama_8b_variant(variant: str, args: dict, bw: float, workload: Workload,
                     prompts: list[list[int]], ref: dict[str, Any], rows: list[Row],
                     accuracy: list[Accuracy]) -> None:
    """One engine for the throughput run, the batch-1 step and the accuracy. bf16 runs first
    and leaves its greedy tokens and their scores in ``ref``."""
    (row, llm), kv_tokens = kv_tokens_logged(lambda: throughput_row(
        "llama-3.1-8b", workload, bw, "above bf16", **args))
    row.name = f"8b {variant}: {len(workload.prompts)} reqs"
    rows.append(row)
    step_ms, floor_ms = batch1_step_ms(llm, bw)
    rows.append(Row(f"8b {variant}: batch-1 decode step", step_ms, "ms", floor_ms,
                    "<= 1.15x floor" if "weights" in variant else ""))
    rows.append(Row(f"8b {variant}: KV cache tokens (start-up log)", kv_tokens, "tok"))
    tokens = greedy(llm, prompts)
    if variant == "bf16":
        ref["tokens"] = tokens
    if "tokens" in ref:  # else bf16 failed: nothing to compare with
        scores = teacher_forced(llm, prompts, ref["tokens"])
        ref.setdefault("scores", scores)
        accuracy.append(compare(variant, ref["scores"], scores, ref["tokens"], tokens))
    release(llm)


def scaled_mm_decode_row(bw: float) -> Row:
    """The batch-1 step with decodes through torch._scaled_mm (activations quantized) instead
    of the weight-only kernel: which of the two the engine should take for few tokens."""
    small_m, fp8.SMALL_M = fp8.SMALL_M, 0
    try:
        row = batch1_row("llama-3.1-8b", bw, "compare: weight-only kernel", quantization="fp8")
    finally:
        fp8.SMALL_M = small_m
    row.name = "8b fp8 weights: batch-1 step, _scaled_mm"
    return row


def alternating(config: str, workload: Workload, bw: float, target: str,
                variants: dict[str, dict], repeat: int, batch1: bool = False) -> list[Row]:
    """Each variant's engine ``repeat`` times, alternating: a row per run (with the KV tokens
    its start-up logged, and with ``batch1`` its batch-1 decode step), then each variant's
    median."""
    rows: list[Row] = []
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeat):
        for name, args in variants.items():
            (row, llm), kv_tokens = kv_tokens_logged(lambda a=args: throughput_row(
                config, workload, bw, target, **a))
            row.name = f"{config} {name}: {len(workload.prompts)} reqs, run {i + 1}"
            runs[name].append(row.measured)
            rows += [row, Row(f"{config} {name}: KV cache tokens (start-up log)", kv_tokens,
                              "tok")] if i == 0 else [row]
            if batch1:
                step_ms, floor_ms = batch1_step_ms(llm, bw)
                rows.append(Row(f"{config} {name}: batch-1 decode step", step_ms, "ms",
                                floor_ms))
            release(llm)
    first = next(iter(variants))
    for name, values in runs.items():
        median = statistics.median(values)
        ratio = median / statistics.median(runs[first])
        rows.append(Row(f"{config} {name}: median of {repeat}", median, "tok/s",
                        target=f"{ratio:.2f}x {first}"))
    return rows


def qwen_kv(bw: float, n: int, repeat: int) -> list[Row]:
    return alternating("qwen3-0.6b", nano_vllm_workload(n), bw, ">= bf16 KV",
                       {"bf16 KV": {"kv_cache_dtype": "auto"},
                        "fp8 KV": {"kv_cache_dtype": "fp8"}}, repeat)


def llama_8b_throughput(bw: float, n: int, repeat: int) -> list[Row]:
    return alternating("llama-3.1-8b", sharegpt_like_workload(n), bw, "fp8 above bf16",
                       {"bf16": {}, "fp8 weights": {"quantization": "fp8"}}, repeat, batch1=True)


def engine_rounds(config: str, args: dict, n: int, rounds: int) -> list[float]:
    """One engine, then ``rounds`` workloads of their own seeds through it (no prefix shared
    across rounds): each round's output tok/s, its GPU spans printed."""
    llm = make_llm(config, max_num_seqs=256, max_model_len=4096, **args)
    run_pagedllm(llm, sharegpt_like_workload(8, seed=99))  # compiles and first launches
    tps = []
    for i in range(rounds):
        with GpuSpans(llm) as spans:
            result = run_pagedllm(llm, sharegpt_like_workload(n, seed=1000 + i))
        print(f"{config} {args or 'bf16'} round {i + 1}: {result.output_tokens_per_s:,.0f} "
              f"tok/s; {spans.summary(result.seconds)}", flush=True)
        tps.append(result.output_tokens_per_s)
    return tps


def separate_engines(config: str, variants: dict[str, dict], n: int, repeat: int,
                     rounds: int = 3) -> list[Row]:
    """Each variant's engine in a process of its own (two engines in one process slowed one
    of them round by round), the processes alternating ``repeat`` times; each runs ``rounds``
    rounds (``engine_rounds``), the first dropped. A row per process (median of its kept
    rounds), then each variant's median over all kept rounds and its ratio to the first."""
    kept: dict[str, list[float]] = {name: [] for name in variants}
    rows: list[Row] = []
    for i in range(repeat):
        for name, args in variants.items():
            spec = json.dumps({"config": config, "args": args, "n": n, "rounds": rounds})
            proc = subprocess.run([sys.executable, __file__, "--engine-rounds", spec],
                                  capture_output=True, text=True, check=True)
            print(proc.stdout, end="", flush=True)
            tps = json.loads(proc.stdout.splitlines()[-1])[1:]
            kept[name] += tps
            rows.append(Row(f"{config} {name}: process {i + 1}, median of rounds 2-{rounds}",
                            statistics.median(tps), "tok/s"))
    first = next(iter(variants))
    for name, values in kept.items():
        ratio = statistics.median(values) / statistics.median(kept[first])
        rows.append(Row(f"{config} {name}: median of {len(values)} rounds",
                        statistics.median(values), "tok/s", target=f"{ratio:.2f}x {first}"))
    return rows


SECTIONS = ("tests", "8b", "scaled-mm", "qwen-kv", "8b-throughput", "8b-rounds", "profile-b1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--engine-rounds", help=argparse.SUPPRESS)  # separate_engines' child
    args = parser.parse_args()
    if args.engine_rounds:
        spec = json.loads(args.engine_rounds)
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(engine_rounds(spec["config"], spec["args"], spec["n"], spec["rounds"])))
        return
    only = set(args.only or [s for s in SECTIONS
                             if s not in ("8b-throughput", "8b-rounds", "profile-b1")])
    if args.skip_tests:
        only.discard("tests")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tests = run_tests() if "tests" in only else "skipped"
    bw = copy_bandwidth()
    n_8b, n_prompts, n_nano = (100, 16, 64) if args.quick else (500, 64, 256)
    rows: list[Row] = []
    accuracy: list[Accuracy] = []
    if "profile-b1" in only:
        profile_decode("llama-3.1-8b", 1, 128, quantization="fp8")
    if "8b" in only:
        rows, accuracy = llama_8b(bw, n_8b, n_prompts)
    sections = {"scaled-mm": lambda: [scaled_mm_decode_row(bw)],
                "qwen-kv": lambda: qwen_kv(bw, n_nano, args.repeat),
                "8b-throughput": lambda: llama_8b_throughput(bw, n_8b, args.repeat),
                "8b-rounds": lambda: separate_engines(
                    "llama-3.1-8b", {"bf16": {}, "fp8 weights": {"quantization": "fp8"}}, n_8b,
                    args.repeat)}
    for name, section in sections.items():
        if name in only:
            try:
                rows += section()
            except Exception:  # noqa: BLE001 - reported in the table
                rows.append(failed(name))
    print(f"\nFP8 kernel tests on {torch.cuda.get_device_name()}: {tests}")
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s")
    if accuracy:
        print(f"\nAccuracy, Llama-3.1-8B shape, random weights, {n_prompts} prompts: bf16's "
              f"greedy tokens scored by teacher forcing; greedy agreement over the first "
              f"{POSITIONS}")
        print(f"{'variant':<16} {'mean |dlp|':>12} {'max |dlp|':>12} {'agreement':>12} "
              f"{'common prefix':>14}")
        for a in accuracy:
            print(a.line())
    print(f"\n{'measurement':<46} {'value':>12} {'unit':<6} {'roofline':>12} {'ratio':>6}  target")
    for r in rows:
        print(r.line())


if __name__ == "__main__":
    main()
