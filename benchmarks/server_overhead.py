"""Serving overhead: the same requests through `pagedllm serve` (streamed, N concurrent clients)
and straight through the offline engine, in one run; also the server's start-up time.

    python benchmarks/server_overhead.py [--num-prompts 64] [--concurrency 32]

Start-up is measured from process start to the first answered completion request. Generation
throughput = output tokens / wall time of the whole batch, on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_tokenizer, sample_random_requests
from pagedllm.benchmarks.serve import ServeConfig, run_benchmark

ENGINE_FLAGS = ["--max-num-seqs", "64", "--max-model-len", "2048",
                "--kv-cache-memory-bytes", str(1 << 30)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answered(port: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Seconds until the server on ``port`` answers a one-token completion."""
    start = time.perf_counter()
    body = b'{"prompt": "Hello", "max_tokens": 1}'
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=5).read()
            return time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not answer within {timeout:.0f} s")


def start_server(port: int) -> tuple[subprocess.Popen, float]:
    """Starts `pagedllm serve`; returns it and the seconds until it answered a completion."""
    proc = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve",
                             "--port", str(port), *ENGINE_FLAGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_until_answered(port, proc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    proc, startup = start_server(port)
    try:
        tokenizer = load_tokenizer(None)
        requests = sample_random_requests(tokenizer, args.num_prompts, args.input_len,
                                          args.output_len, seed=0)
        config = ServeConfig(base_url=f"http://127.0.0.1:{port}", model=None,
                             max_concurrency=args.concurrency, ignore_eos=True,
                             disable_tqdm=True)
        served = asyncio.run(run_benchmark(requests, config))
    finally:
        proc.terminate()
        proc.wait()
    llm = LLM(max_num_seqs=64, max_model_len=2048, kv_cache_memory_bytes=1 << 30)
    params = [SamplingParams(max_tokens=r.expected_output_len, ignore_eos=True, temperature=0)
              for r in requests]
    llm.generate([r.prompt for r in requests[:2]], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
    offline_s = time.perf_counter() - start
    offline_tps = sum(len(o.outputs[0].token_ids) for o in outs) / offline_s
    server_tps = served.output_throughput
    print(f"start-up to first answer: {startup:.1f} s")
    print(f"offline engine:  {offline_tps:8.1f} output tok/s")
    print(f"server ({args.concurrency} streams): {server_tps:8.1f} output tok/s  "
          f"({server_tps / offline_tps:.2f}x offline; median TTFT {served.ttft.median:.0f} ms, "
          f"median ITL {served.itl.median:.0f} ms)")



if __name__ == "__main__":
    main()
