"""pagedllm's server vs. its peers on the same `bench serve` workload, in one run.

    python benchmarks/peers.py [--llama-server /path/to/llama-server]
        [--llama-cpp-python /path/to/venv/bin/python] [--num-prompts 32]

Peers (optional; none is a dependency of pagedllm):
- llama.cpp's own server (``llama-server``, built from llama.cpp's sources: the copy vendored in
  llama-cpp-python's PyPI sdist builds with cmake), given by ``--llama-server``, with one slot
  per concurrent client and continuous batching, serving the same SmolLM2 GGUF file;
- llama-cpp-python's OpenAI server (``llama-cpp-python[server]``, built from PyPI, run with the
  Python given by ``--llama-cpp-python``), which serves one request at a time;
- transformers' offline ``generate`` over the same prompts (a minimal reference, batched).
Every server gets the same random-text prompts through pagedllm's load client, with
``--max-concurrency`` clients; output tokens come from each server's usage counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

from pagedllm.benchmarks.datasets import SampleRequest, load_tokenizer, sample_random_requests
from pagedllm.benchmarks.serve import ServeConfig, run_benchmark
from pagedllm.benchmarks.serve_metrics import BenchmarkMetrics

sys.path.insert(0, os.path.dirname(__file__))
from server_overhead import free_port, wait_until_answered  # noqa: E402


def serve_and_bench(cmd: list[str], port: int, requests: list[SampleRequest],
                    concurrency: int, extra_body: dict | None = None) -> BenchmarkMetrics:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answered(port, proc)
        config = ServeConfig(base_url=f"http://127.0.0.1:{port}", max_concurrency=concurrency,
                             ignore_eos=True, disable_tqdm=True, num_warmups=1,
                             extra_body=extra_body)
        return asyncio.run(run_benchmark(requests, config, percentiles=(50.0, 99.0)))
    finally:
        proc.terminate()
        proc.wait()


def transformers_offline(requests: list[SampleRequest], batch_size: int) -> tuple[float, int]:
    """transformers' batched greedy generate over the same prompts: (output tok/s, tokens)."""
    import torch

    from pagedllm.benchmarks.throughput import Workload, load_transformers_model, run_transformers

    model = load_transformers_model(None, "auto", torch.float32, torch.device("cpu"))
    tok = load_tokenizer(None)
    work = Workload([tok.encode(r.prompt) for r in requests],
                    [r.expected_output_len for r in requests])
    result = run_transformers(model, work, batch_size)
    return result.output_tokens_per_s, result.output_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--llama-cpp-python", default=None,
                        help="Python with llama-cpp-python[server] installed.")
    parser.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama.cpp's threads (pagedllm: torch's default)")
    args = parser.parse_args()
    from pagedllm.models.loader import resolve_model

    gguf = resolve_model(None).path
    requests = sample_random_requests(load_tokenizer(None), args.num_prompts, args.input_len,
                                      args.output_len, seed=0)
    rows = []
    port = free_port()
    m = serve_and_bench([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port",
                         str(port), "--max-model-len", "2048", "--kv-cache-memory-bytes",
                         str(1 << 30)], port, requests, args.concurrency)
    rows.append(("pagedllm serve", m))
    if args.llama_server:
        port = free_port()
        slots = args.concurrency
        m = serve_and_bench([args.llama_server, "-m", gguf, "--port", str(port), "-t",
                             str(args.threads), "-np", str(slots), "-cb", "--no-webui", "-c",
                             str(slots * (args.input_len + args.output_len + 64))],
                            port, requests, args.concurrency)
        rows.append((f"llama.cpp llama-server (-np {slots}, -t {args.threads})", m))
    if args.llama_cpp_python:
        port = free_port()
        m = serve_and_bench([args.llama_cpp_python, "-m", "llama_cpp.server", "--model", gguf,
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
                             # by default a new request interrupts the one being generated
                             "--interrupt_requests", "False"],
                            port, requests, args.concurrency,
                            # its server has no ignore_eos: forbid EOS (id 2) instead
                            extra_body={"logit_bias": {"2": -100}})
        rows.append(("llama.cpp (llama-cpp-python server)", m))
    hf_tps, _ = transformers_offline(requests, batch_size=args.num_prompts)
    print(f"\n{args.num_prompts} prompts of ~{args.input_len} tokens, {args.output_len} output "
          f"tokens, {args.concurrency} concurrent clients")
    print(f"{'engine':<38} {'ok':>3} {'in tok':>7} {'out tok':>7} {'out tok/s':>9} "
          f"{'TTFT p50':>9} {'TPOT p50':>9} {'ITL p50':>8}")
    for name, m in rows:
        print(f"{name:<38} {m.completed:>3} {m.total_input:>7} {m.total_output:>7} "
              f"{m.output_throughput:>9.1f} {m.ttft.median:>8.0f}ms {m.tpot.median:>8.0f}ms "
              f"{m.itl.median:>7.0f}ms")
    print(f"{'transformers generate (offline, batch)':<38} {'':>3} {'':>7} {'':>7} "
          f"{hf_tps:>9.1f}")


if __name__ == "__main__":
    main()
