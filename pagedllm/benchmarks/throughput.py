"""``pagedllm bench throughput``: one offline workload through ``LLM.generate`` (and, with
``--compare-transformers``, through transformers' batched ``generate``), reporting tokens/s.

Workloads (random token ids, ``ignore_eos``, so every request produces exactly its output length):
- ``random``: ``--num-prompts`` prompts of ``--input-len`` x [1 - ratio, 1 + ratio] tokens and
  ``--output-len`` x [1 - output ratio, 1 + output ratio] outputs (defaults: 63-512, 63-128);
- ``nano-vllm``: nano-vllm's bench, 256 sequences with input and output lengths uniform in
  [100, 1024];
- ``shared-prefix``: ``--num-prompts`` requests that share a ``--prefix-len``-token system prompt,
  run with prefix caching on and then off, reporting prompt tokens computed and throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass

from pagedllm.config import add_engine_args, engine_kwargs_from_args

logger = logging.getLogger(__name__)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class RunResult:
    name: str
    seconds: float
    output_tokens: int
    prompt_tokens_computed: int | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = random.Random(args.workload_seed)

    def draw(mean: int, ratio: float) -> int:
        lo, hi = int(mean * (1 - ratio)), int(mean * (1 + ratio))
        return max(1, rng.randint(lo, hi))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    if args.workload == "nano-vllm":
        n = 256
        return Workload([tokens(rng.randint(100, 1024)) for _ in range(n)],
                        [rng.randint(100, 1024) for _ in range(n)])
    prefix = tokens(args.prefix_len) if args.workload == "shared-prefix" else []
    prompts = [prefix + tokens(draw(args.input_len, args.range_ratio))
               for _ in range(args.num_prompts)]
    return Workload(prompts, [draw(args.output_len, args.output_range_ratio)
                              for _ in range(args.num_prompts)])


def run_pagedllm(llm, workload: Workload, name: str = "pagedllm") -> RunResult:  # noqa: ANN001
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in workload.output_lens]
    before = llm.engine.get_stats().prompt_tokens
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, (produced, workload.num_output_tokens)
    return RunResult(name, seconds, produced, llm.engine.get_stats().prompt_tokens - before)


def run_transformers(model, workload: Workload, batch_size: int) -> RunResult:  # noqa: ANN001
    """transformers' batched greedy generate, left-padded; requests sorted by output length so a
    batch wastes little; only the requested tokens count."""
    import torch

    order = sorted(range(len(workload.prompts)), key=lambda i: -workload.output_lens[i])
    device = next(model.parameters()).device
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        width = max(len(workload.prompts[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            p = workload.prompts[i]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        new = max(workload.output_lens[i] for i in batch)
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    return RunResult(f"transformers (batch {batch_size})", seconds, workload.num_output_tokens)


def load_transformers_model(model: str | None, load_format: str, dtype, device):  # noqa: ANN001, ANN201
    """transformers' model of the same files pagedllm serves (random weights for dummy)."""
    import os

    import torch
    import transformers

    from pagedllm.models.loader.source import resolve_model

    source = resolve_model(model)
    if load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(source.path)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif source.kind == "gguf":
        folder, name = os.path.split(source.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.to(device).eval()


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="random",
                        choices=["random", "nano-vllm", "shared-prefix"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=288, help="Mean prompt length.")
    parser.add_argument("--output-len", type=int, default=96, help="Mean output length.")
    parser.add_argument("--range-ratio", type=float, default=0.78,
                        help="Prompt lengths are uniform in mean x [1 - ratio, 1 + ratio].")
    parser.add_argument("--output-range-ratio", type=float, default=0.34,
                        help="Output lengths are uniform in mean x [1 - ratio, 1 + ratio].")
    parser.add_argument("--prefix-len", type=int, default=400,
                        help="Shared prefix length (shared-prefix workload).")
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
    llm = LLM(**kwargs)
    workload = make_workload(args, llm.engine.vocab_size)
    logger.info("workload %s: %d requests, %d prompt tokens, %d output tokens", args.workload,
                len(workload.prompts), sum(map(len, workload.prompts)),
                workload.num_output_tokens)
    run_pagedllm(llm, Workload(workload.prompts[:2], [4, 4]), "warm-up")
    results = [run_pagedllm(llm, workload)]
    if args.workload == "shared-prefix":
        off = LLM(**{**kwargs, "enable_prefix_caching": False})
        run_pagedllm(off, Workload(workload.prompts[:2], [4, 4]), "warm-up")
        results[0].name = "pagedllm (prefix caching on)"
        results.append(run_pagedllm(off, workload, "pagedllm (prefix caching off)"))
    hf_model = None
    if args.compare_transformers:
        runner = llm.engine.runner
        hf_model = load_transformers_model(args.model, args.load_format, runner.dtype,
                                           runner.device)
        hf = [run_transformers(hf_model, workload, int(b))
              for b in args.hf_batch_sizes.split(",")]
        results.append(max(hf, key=lambda r: r.output_tokens_per_s))
        results += [r for r in hf if r is not results[-1]]
    if args.batch1_tokens:
        results += batch1_decode(llm, hf_model, workload, args.batch1_tokens)
    _report(results, args.output_json)
    return 0


def batch1_decode(llm, hf_model, workload: Workload,  # noqa: ANN001
                  num_tokens: int) -> list[RunResult]:
    """Decode of one request alone, by pagedllm and (if given) transformers."""
    one = Workload(workload.prompts[:1], [num_tokens])
    results = [run_pagedllm(llm, one, "pagedllm batch-1")]
    if hf_model is not None:
        r = run_transformers(hf_model, one, 1)
        r.name = "transformers batch-1"
        results.append(r)
    return results


def _report(results: list[RunResult], path: str | None) -> None:
    base = results[0].output_tokens_per_s
    lines = [f"{'run':<36} {'seconds':>8} {'out tok':>8} {'out tok/s':>10} {'ratio':>6} "
             f"{'prompt tok computed':>19}"]
    for r in results:
        computed = "" if r.prompt_tokens_computed is None else str(r.prompt_tokens_computed)
        lines.append(f"{r.name:<36} {r.seconds:>8.2f} {r.output_tokens:>8} "
                     f"{r.output_tokens_per_s:>10.1f} {base / r.output_tokens_per_s:>6.2f} "
                     f"{computed:>19}")
    print("\n".join(lines))  # the report is the command's output
    if path:
        with open(path, "w") as f:
            json.dump([asdict(r) | {"output_tokens_per_s": r.output_tokens_per_s}
                       for r in results], f, indent=2)
