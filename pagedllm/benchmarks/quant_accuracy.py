"""How far a quantized engine is from its reference on the same weights (float32, the dequantized
checkpoint): both score the reference's own greedy continuations (teacher forcing, through
``prompt_logprobs``), so every position compares the same token after the same context.

Reported: the mean and largest |logprob difference| of those tokens, the share of positions where
the reference's greedy token is also the quantized engine's first choice (rank 1), and how many
tokens each prompt's free-running greedy outputs share before they first differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at", "import numpy as np\n",
           "My favourite food is", "The theory of relativity"]


@dataclass(frozen=True)
class AccuracyReport:
    mean_abs_logprob_diff: float
    max_abs_logprob_diff: float
    top1_agreement: float  # share of positions where the reference's token is ranked first
    greedy_prefix_lens: list[int]  # per prompt: tokens equal before the first difference
    num_tokens: int  # greedy tokens per prompt

    def summary(self) -> str:
        return (f"|dlogprob| mean {self.mean_abs_logprob_diff:.4f} max "
                f"{self.max_abs_logprob_diff:.4f}; top-1 agreement {self.top1_agreement:.1%}; "
                f"greedy tokens equal before the first difference {self.greedy_prefix_lens} "
                f"(of {self.num_tokens})")


def _scored(outputs: list[RequestOutput], prompt_lens: list[int]) -> list[list[tuple[float, int]]]:
    """(logprob, rank) of each continuation token, per request."""
    rows = []
    for out, start in zip(outputs, prompt_lens):
        entries = out.prompt_logprobs[start:]
        rows.append([(e[t].logprob, e[t].rank) for t, e in
                     zip(out.prompt_token_ids[start:], entries)])
    return rows


def compare_to_reference(reference, engine, prompts: list[str] = PROMPTS,  # noqa: ANN001
                         num_tokens: int = 32) -> AccuracyReport:
    """``reference`` and ``engine``: ``LLM``s on the same weights."""
    greedy = SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True)
    ref_out = reference.generate(prompts, greedy, use_tqdm=False)
    own_out = engine.generate(prompts, greedy, use_tqdm=False)
    prefix = [next((i for i, (a, b) in enumerate(zip(r.outputs[0].token_ids,
                                                      o.outputs[0].token_ids)) if a != b),
                   num_tokens) for r, o in zip(ref_out, own_out)]
    forced = [{"prompt_token_ids": r.prompt_token_ids + list(r.outputs[0].token_ids)}
              for r in ref_out]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)
    lens = [len(r.prompt_token_ids) for r in ref_out]
    ref_rows = _scored(reference.generate(forced, score, use_tqdm=False), lens)
    own_rows = _scored(engine.generate(forced, score, use_tqdm=False), lens)
    diffs = [abs(a - b) for rr, oo in zip(ref_rows, own_rows)
             for (a, _), (b, _) in zip(rr, oo)]
    top1 = [rank == 1 for row in own_rows for _, rank in row]
    return AccuracyReport(sum(diffs) / len(diffs), max(diffs), sum(top1) / len(top1), prefix,
                          num_tokens)
