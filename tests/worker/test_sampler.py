"""The batched sampler against plain per-row references, on small random tensors.

Each knob (logit bias, min_tokens ban, repetition / frequency / presence penalties, temperature,
min_p, top_k, top_p) is checked against the formula it implements, and the sampled distribution
against softmax(logits / T) after filtering, with many seeded draws on a small vocabulary.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pagedllm.worker.sampler import (
    Sampler,
    SamplingTensors,
    apply_penalties,
    apply_top_k_top_p_min_p,
    gather_logprobs,
)

NEG_INF = float("-inf")


def make_tensors(n: int, *, temperature: float | list[float] = 1.0,
                 top_p: float | list[float] = 1.0, top_k: int | list[int] = 0,
                 min_p: float | list[float] = 0.0, presence: float | list[float] = 0.0,
                 frequency: float | list[float] = 0.0, repetition: float | list[float] = 1.0,
                 generators: list[torch.Generator | None] | None = None,
                 **extra) -> SamplingTensors:
    def col(v, dtype=torch.float32):
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dtype)

    temp, k, p, mp = col(temperature), col(top_k, torch.int64), col(top_p), col(min_p)
    # The host-side flags, derived as the model runner derives them.
    return SamplingTensors(
        temperature=temp, top_p=p, top_k=k, min_p=mp, presence_penalty=col(presence),
        frequency_penalty=col(frequency), repetition_penalty=col(repetition),
        generators=generators or [None] * n, all_greedy=bool((temp <= 0).all()),
        use_min_p=bool((mp > 0).any()), use_top_k=bool((k > 0).any()),
        use_top_p=bool((p < 1).any()), **extra)


def counts_of(token_lists: list[list[int]], vocab: int) -> torch.Tensor:
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.int64)
    for i, toks in enumerate(token_lists):
        for t in toks:
            counts[i, t] += 1
    return counts


# -- plain per-row references ----------------------------------------------------------------


def ref_penalties(row: torch.Tensor, prompt: list[int], output: list[int], rep: float,
                  freq: float, pres: float) -> torch.Tensor:
    """HF/vLLM repetition penalty on every seen token (prompt or output): positive logits are
    divided, negative ones multiplied; then OpenAI's ``- freq * count - pres * [count > 0]`` on
    the output tokens."""
    row = row.clone()
    for tok in set(prompt) | set(output):
        value = float(row[tok])
        row[tok] = value / rep if value > 0 else value * rep
    for tok, count in Counter(output).items():
        row[tok] -= freq * count + pres
    return row


def ref_filter(row: torch.Tensor, k: int, p: float, min_p: float) -> torch.Tensor:
    """min_p (relative to the top probability), then top_k, then top_p over what is left:
    the smallest set of most likely tokens whose probability reaches p."""
    row = row.clone()
    if min_p > 0:
        probs = row.softmax(-1)
        row[probs < min_p * probs.max()] = NEG_INF
    if k > 0:
        kth = sorted(row.tolist(), reverse=True)[min(k, len(row)) - 1]
        row[row < kth] = NEG_INF
    if p < 1:
        probs = row.softmax(-1).tolist()
        keep, total = set(), 0.0
        for tok in sorted(range(len(probs)), key=lambda t: -probs[t]):
            if total >= p:
                break
            keep.add(tok)
            total += probs[tok]
        for tok in range(len(probs)):
            if tok not in keep:
                row[tok] = NEG_INF
    return row


def ref_probs(row: torch.Tensor, temperature: float, k: int = 0, p: float = 1.0,
              min_p: float = 0.0) -> torch.Tensor:
    return ref_filter(row / temperature, k, p, min_p).softmax(-1)


# -- penalties -------------------------------------------------------------------------------


@pytest.mark.parametrize("knob", ["repetition", "frequency", "presence", "all"])
def test_penalties_match_reference(knob):
    gen = torch.Generator().manual_seed(0)
    n, vocab = 6, 40
    logits = torch.randn(n, vocab, generator=gen) * 3
    prompts = [torch.randint(0, vocab, (8,), generator=gen).tolist() for _ in range(n)]
    outputs = [torch.randint(0, vocab, (int(i) * 2,), generator=gen).tolist() for i in range(n)]
    rep = [1.0, 1.3, 2.0, 0.7, 1.0, 1.5]
    freq = [0.0, 0.5, -0.4, 1.2, 2.0, 0.3]
    pres = [0.0, 0.25, 1.0, -1.0, 0.7, 2.0]
    if knob != "all":  # only this knob; the others stay neutral
        rep = rep if knob == "repetition" else [1.0] * n
        freq = freq if knob == "frequency" else [0.0] * n
        pres = pres if knob == "presence" else [0.0] * n
    t = make_tensors(n, repetition=rep, frequency=freq, presence=pres,
                     output_counts=counts_of(outputs, vocab),
                     prompt_mask=counts_of(prompts, vocab) > 0)
    got = apply_penalties(logits, t)
    for i in range(n):
        want = ref_penalties(logits[i], prompts[i], outputs[i], rep[i], freq[i], pres[i])
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
    # Row 0 is neutral, and a penalty never touches a token that was not seen.
    torch.testing.assert_close(got[0], logits[0])
    unseen = ~(counts_of(prompts, vocab) > 0) & ~(counts_of(outputs, vocab) > 0)
    assert torch.equal(got[unseen], logits[unseen])


def test_repetition_penalty_pushes_seen_tokens_down_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    t = make_tensors(1, repetition=2.0, prompt_mask=torch.tensor([[True, True, False, False]]))
    assert apply_penalties(logits, t).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_frequency_counts_occurrences_presence_does_not():
    logits = torch.zeros(2, 4)
    counts = torch.tensor([[3, 1, 0, 0], [3, 1, 0, 0]])
    t = make_tensors(2, frequency=[0.5, 0.0], presence=[0.0, 0.5], output_counts=counts)
    assert apply_penalties(logits, t).tolist() == [[-1.5, -0.5, 0.0, 0.0],
                                                   [-0.5, -0.5, 0.0, 0.0]]


# -- min_p, top_k, top_p ---------------------------------------------------------------------


@pytest.mark.parametrize("knob", ["top_k", "top_p", "min_p", "all"])
def test_top_k_top_p_min_p_match_reference(knob):
    gen = torch.Generator().manual_seed(1)
    n, vocab = 8, 30
    logits = torch.randn(n, vocab, generator=gen) * 2
    ks = [0, 1, 3, 5, 10, 29, 30, 100]
    ps = [1.0, 0.9, 0.5, 0.75, 0.3, 0.95, 0.05, 0.6]
    min_ps = [0.0, 0.05, 0.2, 0.0, 0.5, 0.01, 0.1, 1.0]
    if knob != "all":
        ks = ks if knob == "top_k" else [0] * n
        ps = ps if knob == "top_p" else [1.0] * n
        min_ps = min_ps if knob == "min_p" else [0.0] * n
    got = apply_top_k_top_p_min_p(logits, torch.tensor(ks), torch.tensor(ps),
                                  torch.tensor(min_ps))
    for i in range(n):
        want = ref_filter(logits[i], ks[i], ps[i], min_ps[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: kept set differs"
        kept = ~torch.isinf(want)
        torch.testing.assert_close(got[i][kept], logits[i][kept])  # survivors are untouched
        assert kept[logits[i].argmax()], "the most likely token is always kept"


def test_top_k_keeps_exactly_k_and_top_p_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    got = apply_top_k_top_p_min_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.65]),
                                  torch.tensor([0.0, 0.0]))
    assert torch.isinf(got).tolist() == [[False, False, True, True], [False, False, True, True]]
    # min_p 0.5: tokens below half the top probability (0.2 and 0.1 < 0.2) go.
    got = apply_top_k_top_p_min_p(logits[:1], torch.tensor([0]), torch.tensor([1.0]),
                                  torch.tensor([0.6]))
    assert torch.isinf(got).tolist() == [[False, False, True, True]]


# -- the full sampler ------------------------------------------------------------------------


def test_greedy_rows_are_argmax_after_bias_ban_and_penalties():
    gen = torch.Generator().manual_seed(2)
    n, vocab = 6, 50
    logits = torch.randn(n, vocab, generator=gen)
    top = logits.argmax(-1)
    bias = torch.zeros(n, vocab)
    bias[1, 7] = 100.0  # row 1: the bias makes token 7 the argmax
    bias[2, top[2]] = -100.0  # row 2: the bias removes the argmax
    banned = torch.zeros(n, vocab, dtype=torch.bool)
    banned[3, top[3]] = True  # row 3: min_tokens bans the argmax (a stop token)
    outputs = [[], [], [], [], [int(top[4])] * 3, []]  # row 4: frequency penalty on the argmax
    temperature = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # row 5 samples; the rest are greedy
    t = make_tensors(n, temperature=temperature, frequency=[0, 0, 0, 0, 2.0, 0],
                     output_counts=counts_of(outputs, vocab), logit_bias=bias, banned=banned,
                     generators=[None] * 5 + [torch.Generator().manual_seed(5)])
    got = Sampler()(logits, t).token_ids
    expected = logits + bias
    expected = expected.masked_fill(banned, NEG_INF)
    expected[4] = ref_penalties(expected[4], [], outputs[4], 1.0, 2.0, 0.0)
    assert got[:5].tolist() == expected[:5].argmax(-1).tolist()
    assert got[1] == 7 and got[2] != top[2] and got[3] != top[3] and got[4] != top[4]


def test_banned_and_filtered_tokens_are_never_sampled():
    torch.manual_seed(0)
    n, vocab = 4000, 6
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0]).repeat(n, 1)
    banned = torch.zeros(n, vocab, dtype=torch.bool)
    banned[:, 0] = True  # the most likely token is a stop token before min_tokens
    t = make_tensors(n, temperature=2.0, top_k=3, banned=banned)
    counts = torch.bincount(Sampler()(logits, t).token_ids, minlength=vocab)
    # top_k counts among the allowed tokens: 1, 2, 3 are the top 3 once 0 is banned.
    assert counts[0] == 0 and counts[4] == 0 and counts[5] == 0
    assert (counts[1:4] > 0).all()


def _chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    support = expected_probs > 0
    assert observed[~support].sum() == 0, "a token of probability 0 was sampled"
    n = observed.sum()
    exp = expected_probs[support].double() * n
    stat = ((observed[support].double() - exp) ** 2 / exp).sum()
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    # chi-square survival function: Q(df / 2, stat / 2)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


CASES = {  # temperature, top_k, top_p, min_p
    "temperature 1": (1.0, 0, 1.0, 0.0),
    "temperature 0.5": (0.5, 0, 1.0, 0.0),
    "temperature 2": (2.0, 0, 1.0, 0.0),
    "top_k 3": (1.0, 3, 1.0, 0.0),
    "top_p 0.7": (0.8, 0, 0.7, 0.0),
    "min_p 0.15": (1.2, 0, 1.0, 0.15),
    "top_k 5 + top_p 0.9": (1.5, 5, 0.9, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_frequencies_match_filtered_softmax(case):
    temperature, k, p, min_p = CASES[case]
    torch.manual_seed(1234)
    draws, vocab = 20000, 8
    row = torch.tensor([1.5, 1.2, 0.9, 0.5, 0.2, 0.0, -0.5, -1.0])
    t = make_tensors(draws, temperature=temperature, top_k=k, top_p=p, min_p=min_p)
    tokens = Sampler()(row.repeat(draws, 1), t).token_ids
    observed = torch.bincount(tokens, minlength=vocab)
    want = ref_probs(row, temperature, k, p, min_p)
    assert _chi_square_p_value(observed, want) > 1e-4, (observed / draws, want)
    torch.testing.assert_close(observed.double() / draws, want.double(), atol=0.015, rtol=0)


def test_sampled_frequencies_include_bias_and_penalties():
    torch.manual_seed(99)
    draws, vocab = 20000, 6
    row = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0, -0.2])
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    outputs = [0, 0, 1]
    t = make_tensors(draws, temperature=0.9, repetition=1.4, frequency=0.3, presence=0.2,
                     logit_bias=bias.repeat(draws, 1),
                     output_counts=counts_of([outputs], vocab).repeat(draws, 1),
                     prompt_mask=counts_of([[2]], vocab).repeat(draws, 1) > 0)
    tokens = Sampler()(row.repeat(draws, 1), t).token_ids
    observed = torch.bincount(tokens, minlength=vocab)
    want = ref_probs(ref_penalties(row + bias, [2], outputs, 1.4, 0.3, 0.2), 0.9)
    assert _chi_square_p_value(observed, want) > 1e-4, (observed / draws, want)


def test_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(3)
    vocab = 64
    steps = [torch.randn(4, vocab, generator=gen) for _ in range(6)]

    def run(rows: list[int], seeded_row: int) -> list[int]:
        seeded = torch.Generator().manual_seed(42)
        out = []
        torch.manual_seed(len(rows))  # unseeded rows draw from the global generator
        for logits in steps:
            n = len(rows)
            gens: list[torch.Generator | None] = [None] * n
            gens[seeded_row] = seeded
            t = make_tensors(n, temperature=[1.0] * n, generators=gens)
            out.append(int(Sampler()(logits[rows], t).token_ids[seeded_row]))
        return out

    alone = run([0], 0)
    assert run([1, 0, 2, 3], 1) == alone
    assert run([3, 2, 0], 2) == alone
    assert len(set(alone)) > 1  # it really samples


def test_logprobs_are_of_the_raw_distribution_with_ranks():
    gen = torch.Generator().manual_seed(4)
    n, vocab, k = 5, 20, 3
    logits = torch.randn(n, vocab, generator=gen)
    bias = torch.zeros(n, vocab)
    bias[:, 0] = 50.0  # forces token 0, whose raw rank is usually not 1
    t = make_tensors(n, temperature=0.0, logit_bias=bias, max_num_logprobs=k)
    out = Sampler()(logits, t)
    assert out.token_ids.tolist() == [0] * n
    raw = logits.log_softmax(-1)
    assert out.logprob_token_ids[:, 0].tolist() == [0] * n
    torch.testing.assert_close(out.logprobs[:, 0], raw[:, 0])
    top_lp, top_ids = raw.topk(k, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_lp)
    want_ranks = [int((raw[i] > raw[i, 0]).sum()) + 1 for i in range(n)]
    assert out.sampled_ranks.tolist() == want_ranks


def test_gather_logprobs_with_zero_top_k_returns_only_the_chosen_token():
    logprobs = torch.tensor([[-0.1, -2.0, -3.0]]).log_softmax(-1)
    ids, lps, ranks = gather_logprobs(logprobs, torch.tensor([2]), 0)
    assert ids.tolist() == [[2]] and ranks.tolist() == [3]
    torch.testing.assert_close(lps, logprobs[:, 2:3])


def test_no_logprobs_unless_asked():
    out = Sampler()(torch.randn(2, 10), make_tensors(2, temperature=0.0))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None
