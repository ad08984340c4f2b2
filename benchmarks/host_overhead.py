"""Host time of one engine step at N running decodes, with the model taken out.

    python benchmarks/host_overhead.py [--batch 256 64 1] [--steps 50] [--repeats 5]
                                       [--temperature 0] [--stream] [--profile]

The real LLMEngine (scheduler, KV cache manager, model runner, sampler, output processor,
detokenizer) runs on a tiny random Llama config with the default model's vocabulary (SmolLM2,
49,152 tokens) and tokenizer, so detokenization costs what it costs in serving. What a GPU would
do is replaced by stand-ins that cost next to nothing:

- ``ModelRunner.forward`` returns a [T, 1] zero tensor (no layers, no attention);
- ``compute_logits`` returns random [N, 64] logits, and the sampled index is mapped to one of
  64 ordinary tokens of English text (the real sampler runs, on a 64-wide vocabulary; at
  temperature > 0 its CPU noise draw, a GPU kernel in serving, is part of "sampling").

What remains is host work. The workload is nano-vllm's (prompts of 100-1,024 random tokens,
``ignore_eos``), greedy and FINAL_ONLY as ``LLM.generate`` runs it (``--stream``: DELTA outputs,
as the server streams). Columns, in ms per decode step: the median over ``--steps`` steps per
repeat, then the best repeat (other processes on a shared machine only ever add time).

- schedule: ``Scheduler.schedule``; prepare: ``ModelRunner._prepare_inputs``;
- sampling: ``_sampling_tensors`` + the sampler;
- update: ``Scheduler.update_from_output``;
- output: the rest of ``step`` outside ``launch`` (stop checks, detokenization, outputs);
- other: the rest of ``launch`` (the model stand-ins and the runner's glue);
- step: the whole ``step``;
- final: the extra time of the step in which all requests finish (final outputs, freeing,
  work deferred to the end such as FINAL_ONLY text), spread over the steps they ran;
- total: step + final.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from pagedllm import SamplingParams
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.models.loader.source import resolve_model
from pagedllm.sampling_params import RequestOutputKind
from pagedllm.tokenizer import Tokenizer, load_tokenizer
from pagedllm.worker.sampler import Sampler, SamplerOutput, SamplingTensors

STAGES = ("schedule", "prepare", "sampling", "update", "output", "other", "step", "final",
          "total")
FAKE_VOCAB = 64
TEXT = ("The quick brown fox jumps over the lazy dog while the engine schedules requests, "
        "allocates blocks of the paged cache, samples tokens and streams text to clients. "
        "Continuous batching keeps the accelerator busy; the host must keep up with it.")


def write_model_folder(folder: str, tokenizer: Tokenizer) -> None:
    """A config-only Llama with SmolLM2's vocabulary, plus the tokenizer in HF format."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 16, "vocab_size": tokenizer.vocab_size,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.backend.save(os.path.join(folder, "tokenizer.json"))
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(special, f)


class MappedSampler:
    """The real sampler over FAKE_VOCAB columns; index i stands for token ``table[i]``."""

    def __init__(self, table: torch.Tensor) -> None:
        self.sampler, self.table = Sampler(), table

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        out = self.sampler(logits, t)
        out.token_ids = self.table[out.token_ids]
        return out


def build_engine(folder: str, batch: int, table: torch.Tensor) -> LLMEngine:
    engine = LLMEngine.from_engine_args(
        model=folder, load_format="dummy", device="cpu", max_num_seqs=max(batch, 1),
        max_model_len=4096, kv_cache_memory_bytes=1 << 28)
    runner = engine.core.runner
    runner.forward = lambda ids, *_: torch.zeros(ids.shape[0], 1)
    runner.model.compute_logits = lambda h: torch.randn(h.shape[0], FAKE_VOCAB)
    runner.sampler = MappedSampler(table)
    return engine


def timed(times: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] += time.perf_counter() - start
    return wrapper


def instrument(engine: LLMEngine) -> dict[str, float]:
    """Wraps the stages' methods on the instances; returns the per-step accumulator."""
    times: dict[str, float] = defaultdict(float)
    sched, runner = engine.core.scheduler, engine.core.runner
    sched.schedule = timed(times, "schedule", sched.schedule)
    sched.update_from_output = timed(times, "update", sched.update_from_output)
    runner.launch = timed(times, "execute", runner.launch)
    runner._prepare_inputs = timed(times, "prepare", runner._prepare_inputs)
    runner._sampling_tensors = timed(times, "sampling", runner._sampling_tensors)
    runner.sampler = timed(times, "sampling", runner.sampler)
    return times


def start_decodes(engine: LLMEngine, batch: int, params: SamplingParams, seed: int) -> None:
    """Adds nano-vllm-like requests and steps until every one of them is decoding."""
    rng = random.Random(seed)
    vocab = engine.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(1000, vocab) for _ in range(rng.randint(100, 1024))]
        engine.add_request(f"r{i}", prompt, params)
    while engine.core.scheduler.waiting or any(
            r.num_output_tokens == 0 for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(5):  # warm-up
        engine.step()


def measure(engine: LLMEngine, times: dict[str, float], steps: int) -> dict[str, float]:
    """Median per stage over ``steps`` decode steps, in ms."""
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        times.clear()
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        row = {name: times[name] for name in ("schedule", "prepare", "sampling", "update")}
        row["output"] = total - times["schedule"] - times["execute"] - times["update"]
        row["other"] = times["execute"] - times["prepare"] - times["sampling"]
        row["step"] = total
        for name, value in row.items():
            samples[name].append(1000 * value)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(folder: str, table: torch.Tensor, batch: int, args: argparse.Namespace) -> dict[str, float]:
    kind = RequestOutputKind.DELTA if args.stream else RequestOutputKind.FINAL_ONLY
    # Far more tokens than measured: no request finishes during prefill or the measurement.
    params = SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=2048,
                            output_kind=kind)
    engine = build_engine(folder, batch, table)
    start_decodes(engine, batch, params, seed=batch)
    times = instrument(engine)
    repeats = [measure(engine, times, args.steps) for _ in range(args.repeats)]
    assert len(engine.core.scheduler.running) == batch, "a request finished during the measurement"
    if args.profile and batch == max(args.batch):
        profile(engine)
    row = {name: min(r[name] for r in repeats) for name in STAGES[:-2]}
    row["final"] = finish_all(engine, row["step"])
    row["total"] = row["step"] + row["final"]
    return row


def finish_all(engine: LLMEngine, step_ms: float) -> float:
    """Ends every request at the next step (its length limit); returns that step's extra time
    (final outputs, freeing, any work deferred to the end) spread over the steps the requests
    ran, in ms per step."""
    running = list(engine.core.scheduler.running)
    for req in running:
        req.sampling_params.max_tokens = req.num_output_tokens + 1
    gc.collect()  # a collection inside this one timed step would swamp it
    start = time.perf_counter()
    outputs = engine.step()
    extra = 1000 * (time.perf_counter() - start) - step_ms
    assert len(outputs) == len(running) and all(o.finished for o in outputs)
    return extra / statistics.mean(r.num_output_tokens for r in running)


def profile(engine: LLMEngine, steps: int = 20) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    print(f"\ncProfile of {steps} steps at batch {len(engine.core.scheduler.running)}:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 64, 1])
    parser.add_argument("--steps", type=int, default=50, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true", help="DELTA outputs every step")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile 20 more steps at the largest batch")
    args = parser.parse_args()
    torch.set_num_threads(1)  # host work is single-threaded Python; keep timings stable
    tokenizer = load_tokenizer(resolve_model(None))
    table = torch.tensor(sorted(set(tokenizer.encode(TEXT)))[:FAKE_VOCAB])
    table = table[torch.arange(FAKE_VOCAB) % len(table)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hov_") as folder:
        write_model_folder(folder, tokenizer)
        for batch in args.batch:
            rows.append((batch, run(folder, table, batch, args)))
    mode = "DELTA" if args.stream else "FINAL_ONLY"
    print(f"\nhost ms per decode step (best median; temperature {args.temperature}, {mode})")
    print("batch " + "".join(f"{name:>10}" for name in STAGES))
    for batch, row in rows:
        print(f"{batch:>5} " + "".join(f"{row[name]:>10.3f}" for name in STAGES))


if __name__ == "__main__":
    main()
