"""Tensor parallelism on the GPUs of one host (run on the nvidia-h200-x2 kind; the TP=4 and
TP=8 jobs on the -x4 and -x8 kinds).

    python benchmarks/gpu_tp_bench.py [--quick] [--only JOB ...]   # default: the TP=2 jobs

gpu_bench.py's workloads and random bf16 weights, each job in a process of its own (a TP engine
holds both GPUs until its workers exit): the Llama-3.1-8B shape's 500 requests and batch-1
decode step at TP=2, Llama-3.2-1B's batch-1 step at TP=1 and TP=2, and the Llama-3.1-70B
shape at TP=2 (start-up, 500 requests, batch-1 step). The rooflines count one rank's bytes:
its share of the weights and of the live KV cache, read once per decode step at the measured
copy bandwidth (the collectives are not in it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from gpu_bench import (  # noqa: E402
    BATCH1_PROMPT,
    BATCH1_STEPS,
    CONFIGS,
    Row,
    copy_bandwidth,
    decode_roofline,
    lone_decode_step_ms,
    make_llm,
    sharegpt_like_workload,
)

from pagedllm.benchmarks.throughput import Workload, run_pagedllm  # noqa: E402
from pagedllm.models.arch import ModelArch  # noqa: E402
from pagedllm.worker import memory  # noqa: E402

# job -> (config, kind, tensor_parallel_size, target)
JOBS = {
    "8b-tp2": ("llama-3.1-8b", "throughput", 2, ">= 17,000 tok/s (vLLM TP=2: 16,874)"),
    "8b-b1-tp2": ("llama-3.1-8b", "batch1", 2, "<= 3.0 ms (vLLM TP=2: 3.45 ms)"),
    "1b-b1-tp1": ("llama-3.2-1b", "batch1", 1, "(vLLM TP=1: 2.11 ms)"),
    "1b-b1-tp2": ("llama-3.2-1b", "batch1", 2, "<= TP=1 (vLLM TP=2: 2.73 ms)"),
    "70b-tp2": ("llama-3.1-70b", "throughput", 2, "reported"),
    "70b-b1-tp2": ("llama-3.1-70b", "batch1", 2, "floor 17.3 ms"),
    # nvidia-h200-x4 and -x8 (issue 19)
    "70b-tp4": ("llama-3.1-70b", "throughput", 4, ">= vLLM TP=4"),
    "70b-b1-tp4": ("llama-3.1-70b", "batch1", 4, "<= 1.3x floor"),
    "405b-fp8-tp8": ("llama-3.1-405b", "throughput", 8, "reported"),
    "405b-fp8-b1-tp8": ("llama-3.1-405b", "batch1", 8, "reported"),
}
# jobs whose weights are quantized to FP8 at load
FP8_JOBS = {"405b-fp8-tp8", "405b-fp8-b1-tp8"}


def rank_bytes(config: str, tp: int, fp8: bool = False) -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of one of ``tp`` ranks, in bf16 (or FP8 weights)."""
    with open(os.path.join(CONFIGS, config, "config.json")) as f:
        arch = ModelArch.from_hf_config(json.load(f))
    weights = memory.weight_bytes_by_dtype(arch, 0, tp)["fp8" if fp8 else "bfloat16"]
    return weights, memory.kv_bytes_per_token(arch.rank_view(tp), "bfloat16")


def run_job(name: str, quick: bool) -> Row:
    config, kind, tp, target = JOBS[name]
    extra = {"quantization": "fp8"} if name in FP8_JOBS else {}
    bw = copy_bandwidth()
    if kind == "throughput":
        workload = sharegpt_like_workload(100 if quick else 500)
        start = time.perf_counter()
        llm = make_llm(config, max_num_seqs=256, max_model_len=4096, tensor_parallel_size=tp,
                       **extra)
        print(f"{name}: start-up {time.perf_counter() - start:.1f} s", flush=True)
        run_pagedllm(llm, Workload(workload.prompts[:4], [8] * 4), "warm-up")
        result = run_pagedllm(llm, workload)
        roof = decode_roofline(*rank_bytes(config, tp, bool(extra)), workload, 256, bw)
        return Row(f"{config} TP={tp}: {len(workload.prompts)} reqs", result.output_tokens_per_s,
                   "tok/s", roof, target)
    llm = make_llm(config, max_num_seqs=8, max_model_len=4096, tensor_parallel_size=tp, **extra)
    step_ms = lone_decode_step_ms(llm)
    weights, kv_tok = rank_bytes(config, tp, bool(extra))
    roof_ms = 1000 * (weights + kv_tok * (len(BATCH1_PROMPT) + BATCH1_STEPS / 2)) / bw
    return Row(f"{config} TP={tp}: batch-1 decode step", step_ms, "ms", roof_ms, target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(JOBS),
                        default=[j for j in JOBS if JOBS[j][2] == 2])
    parser.add_argument("--job", choices=list(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--job-timeout-s", type=float, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.job:
        row = run_job(args.job, args.quick)
        print("ROW", json.dumps(row.__dict__), flush=True)
        return
    rows = []
    for name in args.only:
        cmd = [sys.executable, __file__, "--job", name] + ["--quick"] * args.quick
        try:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                                 timeout=args.job_timeout_s).stdout
        except subprocess.TimeoutExpired:
            rows.append(Row(f"{name}: timed out", 0.0, ""))
            continue
        print(out, flush=True)
        found = [ln for ln in out.splitlines() if ln.startswith("ROW ")]
        rows.append(Row(**json.loads(found[0][4:])) if found else Row(f"{name}: failed", 0.0, ""))
        time.sleep(3)  # the workers' GPU memory goes back
    print(f"\n{'measurement':<46} {'value':>12} {'unit':<6} {'roofline':>12} {'ratio':>6}  target")
    for r in rows:
        print(r.line())


if __name__ == "__main__":
    main()
