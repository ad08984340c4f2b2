"""Batch-1 decode on the CPU, pagedllm's paths side by side in one process, runs alternating.

    python benchmarks/cpu_decode.py [--paths float32,int4,int4-compiled,transformers]
        [--llama-bench /path/to/llama-bench] [--tokens 128] [--runs 5]
    python benchmarks/cpu_decode.py --paths int4 --tokens 32 --profile    # torch.profiler tables

Each path is an ``LLM`` on the default model (float32: the dequantized GGUF; int4/int8:
``--quantization``; ``-compiled``: with ``--compile-cpu``), or ``transformers``: its float32
model's greedy ``generate`` on the same weights. Every run decodes ``--tokens`` tokens after a
64-token prompt (greedy, ``ignore_eos``; the time includes the prompt). ``--llama-bench``
adds llama.cpp on the same GGUF file (its ``llama-bench``, built from llama.cpp's sources): its
``tg`` test of ``--tokens`` tokens with torch's thread count (generation only, no prompt). The
paths take turns so that a change in the machine's load hits them alike. Prints each run and
the medians.
``--profile`` instead profiles one run of the first path (``torch.profiler``, CPU) and prints its
operators by self time and by call count (divide by ``--tokens`` for one step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker.cpu_graph import is_compiled


def build(path: str) -> LLM:
    quant, _, compiled = path.partition("-")
    start = time.perf_counter()
    llm = LLM(quantization=None if quant == "float32" else quant, compile_cpu=bool(compiled),
              kv_cache_memory_bytes=256 * 2**20, max_model_len=1024)
    assert is_compiled(llm.engine.core.runner.model) == bool(compiled)
    print(f"{path}: engine built in {time.perf_counter() - start:.1f} s")
    return llm


def transformers_decode(tokens: int) -> Callable[[list[int]], None]:
    """transformers' float32 model of the same weights: greedy ``generate`` of ``tokens``."""
    from pagedllm.benchmarks.throughput import load_transformers_model

    model = load_transformers_model(None, "auto", torch.float32, torch.device("cpu"))

    def run(prompt: list[int]) -> None:
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False)

    return run


def llama_bench_rate(binary: str, tokens: int) -> float:
    """llama.cpp's generation tok/s over ``tokens`` tokens (one repetition)."""
    from pagedllm.models.loader import resolve_model

    out = subprocess.run([binary, "-m", resolve_model(None).path, "-t",
                          str(torch.get_num_threads()), "-p", "0", "-n", str(tokens), "-r", "1",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["avg_ts"]


def with_profile(run: Callable[[], object]) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    print(averages.table(sort_by="count", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", default="float32,int4,int4-compiled")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    args = parser.parse_args()
    paths = args.paths.split(",")
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
    prompt = list(range(1000, 1064))
    runners: dict[str, Callable[[], object]] = {}
    for path in paths:
        if path == "transformers":
            run = transformers_decode(args.tokens)
            runners[path] = lambda run=run: run(prompt)
        else:
            llm = build(path)
            runners[path] = lambda llm=llm: llm.generate(
                [{"prompt_token_ids": prompt}], params, use_tqdm=False)
    for run in runners.values():
        run()  # warm-up
    if args.profile:
        with_profile(runners[paths[0]])
        return
    rates: dict[str, list[float]] = {p: [] for p in paths}
    if args.llama_bench:
        rates["llama.cpp"] = []
    for run_index in range(args.runs):
        for path, run in runners.items():
            start = time.perf_counter()
            run()
            rates[path].append(args.tokens / (time.perf_counter() - start))
        if args.llama_bench:
            rates["llama.cpp"].append(llama_bench_rate(args.llama_bench, args.tokens))
        print(f"run {run_index}: " + ", ".join(f"{p} {r[-1]:.1f}" for p, r in rates.items()))
    print(f"threads {torch.get_num_threads()}; median batch-1 decode tok/s: " + ", ".join(
        f"{p} {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f})" for p, r in rates.items()))


if __name__ == "__main__":
    main()
