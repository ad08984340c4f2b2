"""GPU throughput and latency against the bandwidth roofline and transformers (run on a GPU).

    python benchmarks/gpu_bench.py [--quick] [--skip-transformers] [--quantization fp8]
                                   [--kv-cache-dtype fp8]

Random weights (``--load-format dummy``) of the configs in benchmarks/configs, bf16 (the two
flags as the engine's: FP8 weights, FP8 KV cache). Workloads:
nano-vllm's (256 sequences, input and output uniform in [100, 1024], ignore_eos) on Qwen3-0.6B and
Llama-3.2-1B shapes; 500 requests of about 200 input / 180 output tokens on Llama-3.1-8B; batch-1
decode step time; transformers' batched generate on the Qwen3-0.6B workload. The roofline of a
workload is the time to read, at every decode step, the weights plus the KV cache of the
running requests, at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.throughput import Workload, run_pagedllm, run_transformers
from pagedllm.worker import memory

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class Row:
    name: str
    measured: float
    unit: str
    roofline: float | None = None
    target: str = ""

    def line(self) -> str:
        ratio = f"{self.measured / self.roofline:6.2f}" if self.roofline else "      "
        roof = f"{self.roofline:12.1f}" if self.roofline else " " * 12
        return (f"{self.name:<46} {self.measured:12.1f} {self.unit:<6} {roof} {ratio}  "
                f"{self.target}")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 5."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * x.numel() / sorted(times[1:])[2]


def nano_vllm_workload(n: int = 256, seed: int = 0, vocab: int = 10000) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    return Workload(prompts, [rng.randint(100, 1024) for _ in range(n)])


def sharegpt_like_workload(n: int = 500, seed: int = 0, vocab: int = 10000) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(150, 250))] for _ in range(n)]
    return Workload(prompts, [rng.randint(135, 225) for _ in range(n)])


def roofline_tokens_per_s(llm: LLM, workload: Workload, max_num_seqs: int, bw: float) -> float:
    """Output tokens/s if every decode step only read the weights and the live KV cache."""
    runner = llm.engine.core.runner
    return decode_roofline(memory.loaded_weight_bytes(runner.model),
                           memory.kv_bytes_per_token(runner.arch, runner.kv_cache_dtype),
                           workload, max_num_seqs, bw)


def decode_roofline(weights: int, kv_tok: int, workload: Workload, max_num_seqs: int,
                    bw: float) -> float:
    """Output tokens/s of decode steps that read ``weights`` bytes and ``kv_tok`` bytes per
    live token at ``bw``: the steps simulated (requests start together, max_num_seqs at a
    time)."""
    pending = sorted(zip(map(len, workload.prompts), workload.output_lens), reverse=True)
    running: list[list[int]] = []
    seconds, tokens = 0.0, 0
    while pending or running:
        while pending and len(running) < max_num_seqs:
            p, o = pending.pop()
            running.append([p, o])
        seconds += (weights + kv_tok * sum(r[0] for r in running)) / bw
        tokens += len(running)
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    return tokens / seconds


def make_llm(config: str, **kwargs) -> LLM:
    return LLM(os.path.join(CONFIGS, config), load_format="dummy", dtype="bfloat16", **kwargs)


class GpuSpans:
    """Where a run's time goes: each step's launch is bracketed by CUDA events on the stream,
    so their sum is the GPU's span of the steps (kernels, and any gap the host leaves while
    it queues a step); wall time minus it is the GPU idle between steps. The host's time in
    each launch is timed too, decode-only steps apart from steps with prompt tokens (CUDA
    graphs up to 2,048 tokens, eager beyond): a GPU span no longer than the host's means the
    host bound it.
    """

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.core.runner
        # (start, end, requests, host seconds in launch, decode-only)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, int, float, bool]] = []

    def __enter__(self) -> GpuSpans:
        launch = self.original = self.runner.launch

        def timed(sched, token_masks=None):  # noqa: ANN001, ANN202
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            host = time.perf_counter()
            start.record()
            out = launch(sched, token_masks)
            end.record()
            decode = all(s.num_new_tokens == 1 for s in sched.scheduled)
            self.events.append((start, end, len(sched.scheduled), time.perf_counter() - host,
                                decode))
            return out

        self.runner.launch = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.launch = self.original

    def summary(self, wall_s: float) -> str:
        torch.cuda.synchronize()
        spans = [a.elapsed_time(b) / 1000 for a, b, *_ in self.events]
        gpu = sum(spans)
        reqs = [e[2] for e in self.events]
        kinds = []
        for decode, kind in ((True, "decode-only"), (False, "with prompts")):
            picked = [(span, e[3]) for span, e in zip(spans, self.events) if e[4] == decode]
            if picked:
                kinds.append(f"{len(picked)} {kind}: GPU {sum(p[0] for p in picked):.2f} s, "
                             f"host in launch {sum(p[1] for p in picked):.2f} s")
        return (f"{len(reqs)} steps (median {int(np.median(reqs))} requests), wall {wall_s:.2f}"
                f" s, GPU span of steps {gpu:.2f} s ({100 * gpu / wall_s:.0f}%), GPU idle between "
                f"steps {wall_s - gpu:.2f} s, mean step {1000 * wall_s / len(reqs):.2f} ms; "
                + "; ".join(kinds))


def throughput_row(config: str, workload: Workload, bw: float, target: str,
                   max_num_seqs: int = 256, **engine_args) -> tuple[Row, LLM]:
    llm = make_llm(config, max_num_seqs=max_num_seqs, max_model_len=4096, **engine_args)
    run_pagedllm(llm, Workload(workload.prompts[:4], [8] * 4), "warm-up")
    with GpuSpans(llm) as spans:
        result = run_pagedllm(llm, workload)
    print(f"{config}: {spans.summary(result.seconds)}")
    roof = roofline_tokens_per_s(llm, workload, max_num_seqs, bw)
    return Row(f"{config}: {len(workload.prompts)} reqs throughput",
               result.output_tokens_per_s, "tok/s", roof, target), llm


def activation_row(config: str, llm: LLM) -> Row:
    """The planner's activation estimate (as 'roofline') against the measured peak."""
    sched = llm.engine.config.scheduler
    runner = llm.engine.core.runner
    estimate = memory.activation_bytes_estimate(runner.arch, sched.max_num_batched_tokens,
                                                sched.max_num_seqs, runner.dtype)
    return Row(f"{config}: peak activations (planner est.)",
               runner.peak_activation_bytes / 2**20, "MiB", estimate / 2**20,
               "estimate within 10%")


def batch1_row(config: str, bw: float, target: str, **engine_args) -> Row:
    """Median wall time of one decode step of a lone request (128-token prompt, prefill
    excluded): engine.step() end to end, host work included."""
    llm = make_llm(config, max_num_seqs=8, max_model_len=4096, **engine_args)
    step_ms, roof_ms = batch1_step_ms(llm, bw)
    release(llm)
    return Row(f"{config}: batch-1 decode step", step_ms, "ms", roof_ms, target)


BATCH1_PROMPT, BATCH1_STEPS = list(range(100, 228)), 256


def lone_decode_step_ms(llm: LLM) -> float:
    """Median ms of a lone request's decode step (128-token prompt, 256 tokens, prefill
    excluded): ``engine.step()`` end to end, host work included."""
    run_pagedllm(llm, Workload([BATCH1_PROMPT], [16]), "warm-up")
    engine = llm.engine
    engine.add_request("b1", BATCH1_PROMPT,
                       SamplingParams(temperature=0, max_tokens=BATCH1_STEPS, ignore_eos=True))
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def batch1_step_ms(llm: LLM, bw: float) -> tuple[float, float]:
    """(median ms of a lone request's decode step, its roofline in ms: the weights and the
    request's mean KV cache read once at ``bw``)."""
    step_ms = lone_decode_step_ms(llm)
    runner = llm.engine.core.runner
    weights = memory.loaded_weight_bytes(runner.model)
    kv = memory.kv_bytes_per_token(runner.arch, runner.kv_cache_dtype) * (
        len(BATCH1_PROMPT) + BATCH1_STEPS / 2)
    return step_ms, 1000 * (weights + kv) / bw


def profile_decode(config: str, batch: int, prompt_len: int, steps: int = 20,
                   **engine_args) -> None:
    """Decode steps of ``batch`` requests with distinct ``prompt_len``-token prompts: wall time
    per step, then cProfile (host) and torch.profiler (kernels) of the same steps."""
    import cProfile
    import pstats

    llm = make_llm(config, max_num_seqs=max(batch, 8), max_model_len=4096, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=3 * steps + 40, ignore_eos=True)
    engine = llm.engine
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(f"p{i}", [rng.randrange(100, 10000) for _ in range(prompt_len)],
                           params)
    while engine.core.scheduler.waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1000 * (time.perf_counter() - start) / steps
    context = sum(r.num_tokens for r in engine.core.scheduler.running)
    floor = (context * memory.kv_bytes_per_token(engine.core.runner.arch, torch.bfloat16)
             + memory.loaded_weight_bytes(engine.core.runner.model)) / copy_bandwidth()
    print(f"\n== {config} decode batch {batch}, context ~{prompt_len}: {ms:.2f} ms/step "
          f"(roofline {1000 * floor:.2f} ms: weights + {context} tokens of KV) ==")
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    ms = 1000 * (time.perf_counter() - start) / steps
    print(f"\n== {config} decode batch {batch}: {ms:.2f} ms/step under cProfile ==")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    wall = 1000 * (time.perf_counter() - start) / steps
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1000
    print(f"== {config} decode batch {batch}: {wall:.2f} ms/step wall under torch.profiler, "
          f"{gpu / steps:.2f} ms/step of kernels ==")
    print(events.table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=60))
    del engine
    release(llm)


def release(llm: LLM) -> None:
    del llm.engine
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="only profile host time of decode steps")
    parser.add_argument("--quantization", choices=["fp8"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = parser.parse_args()
    engine_args = {"quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.profile:
        profile_decode("llama-3.2-1b", 1, 128)
        profile_decode("qwen3-0.6b", 256, 768)
        return
    bw = copy_bandwidth()
    n_nano, n_8b = (64, 100) if args.quick else (256, 500)
    rows = [Row("device copy bandwidth", bw / 1e9, "GB/s")]
    nano = nano_vllm_workload(n_nano)
    activations = []
    row, llm = throughput_row("qwen3-0.6b", nano, bw, ">= 15,000 tok/s", **engine_args)
    rows.append(row)
    activations.append(activation_row("qwen3-0.6b", llm))
    release(llm)
    if not args.skip_transformers:
        try:
            rows.append(transformers_row("qwen3-0.6b", nano, row.measured))
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            rows.append(Row("qwen3-0.6b: transformers generate: out of memory", 0.0, ""))
    row, llm = throughput_row("llama-3.2-1b", nano_vllm_workload(n_nano, seed=1), bw,
                              ">= 25,000 tok/s", **engine_args)
    rows.append(row)
    activations.append(activation_row("llama-3.2-1b", llm))
    release(llm)
    row, llm = throughput_row("llama-3.1-8b", sharegpt_like_workload(n_8b), bw,
                              ">= 6,500 tok/s", **engine_args)
    rows.append(row)
    activations.append(activation_row("llama-3.1-8b", llm))
    release(llm)
    rows.append(batch1_row("llama-3.2-1b", bw, "<= 1.3x roofline (0.82 ms)", **engine_args))
    rows.append(batch1_row("llama-3.1-8b", bw, "<= 1.3x roofline (5.0 ms)", **engine_args))
    rows += activations
    print(f"\n{'measurement':<46} {'value':>12} {'unit':<6} {'roofline':>12} {'ratio':>6}  target")
    for r in rows:
        print(r.line())


def transformers_row(config: str, workload: Workload, pagedllm_tps: float) -> Row:
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(os.path.join(CONFIGS, config))
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model = model.cuda().eval()
    result = run_transformers(model, workload, batch_size=len(workload.prompts))
    del model
    torch.cuda.empty_cache()
    return Row(f"{config}: transformers generate (batch {len(workload.prompts)})",
               result.output_tokens_per_s, "tok/s", None,
               f"pagedllm / transformers = {pagedllm_tps / result.output_tokens_per_s:.1f}x "
               "(target >= 10x)")


if __name__ == "__main__":
    main()
