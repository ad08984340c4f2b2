"""Batch-1 decode on the CPU, pagedllm's paths side by side in one process, runs alternating.

    python benchmarks/cpu_decode.py [--paths float32,int4,int4-compiled] [--tokens 128] [--runs 5]
    python benchmarks/cpu_decode.py --paths int4 --tokens 32 --profile    # torch.profiler tables

Each path is an ``LLM`` on the default model (float32: the dequantized GGUF; int4/int8:
``--quantization``; ``-compiled``: with ``--compile-cpu``). Every run
decodes ``--tokens`` tokens after a 64-token prompt (greedy, ``ignore_eos``); the paths take turns
so that a change in the machine's load hits them alike. Prints each run and the medians.
``--profile`` instead profiles one run of the first path (``torch.profiler``, CPU) and prints its
operators by self time and by call count (divide by ``--tokens`` for one step).
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def profile(llm: LLM, prompt: dict, params: SamplingParams) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    print(averages.table(sort_by="count", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", default="float32,int4,int4-compiled")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    paths = args.paths.split(",")
    engines = {p: build(p) for p in paths}
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
    prompt = {"prompt_token_ids": list(range(1000, 1064))}
    for llm in engines.values():
        llm.generate([prompt], params, use_tqdm=False)  # warm-up
    if args.profile:
        profile(engines[paths[0]], prompt, params)
        return
    rates: dict[str, list[float]] = {p: [] for p in paths}
    for run in range(args.runs):
        for path, llm in engines.items():
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            rates[path].append(args.tokens / (time.perf_counter() - start))
        print(f"run {run}: " + ", ".join(f"{p} {r[-1]:.1f}" for p, r in rates.items()))
    print(f"threads {torch.get_num_threads()}; median batch-1 decode tok/s: " + ", ".join(
        f"{p} {statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f})" for p, r in rates.items()))


if __name__ == "__main__":
    main()
