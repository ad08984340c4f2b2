"""Sampler: logits of the rows that sample this step -> next tokens (+ logprobs), batched.

Order, as in vLLM: the token bitmask (grammars, allowed_token_ids, bad_words) -> logit bias and
min_tokens masking -> repetition / frequency / presence penalties -> (greedy rows take the argmax
here) -> temperature -> min_p, top_k, top_p -> sample.
Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which draws exactly from p; a
seeded request draws its noise from its own generator, so its samples do not depend on what else
is in the batch. No loop over the vocabulary, no host sync but the final token read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling parameters for one step. Rows = requests that sample. Shapes [N]."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 = off
    min_p: torch.Tensor  # float32
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    repetition_penalty: torch.Tensor
    generators: list[torch.Generator | None]  # per row: its own generator, or None (shared)
    output_counts: torch.Tensor | None = None  # [N, V] counts of generated tokens
    prompt_mask: torch.Tensor | None = None  # [N, V] bool: token appears in the prompt
    logit_bias: torch.Tensor | None = None  # [N, V] additive
    banned: torch.Tensor | None = None  # [N, V] bool: stop tokens before min_tokens
    # Rows with a token mask ([k] int64) and their masks ([k, ceil(V / 32)] int32 words, bit j
    # of word i = token 32 i + j allowed); the other rows are not touched.
    bitmask_rows: torch.Tensor | None = None
    token_bitmask: torch.Tensor | None = None
    max_num_logprobs: int = -1  # -1: none requested
    # Host-side flags, so that no step reads device tensors to decide what to compute.
    all_greedy: bool = False
    use_min_p: bool = False
    use_top_k: bool = False
    use_top_p: bool = False


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    # When logprobs were requested: [N, 1 + k] token ids (the sampled one first), their
    # logprobs (of the raw model distribution), and the rank of the sampled token [N].
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets to -inf, in place, the tokens each masked row's bitmask disallows ([N, V])."""
    vocab = logits.shape[-1]
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
        _BIT_SHIFTS[logits.device] = shifts
    # Little-endian int32 words read as bytes keep the token order: byte b, bit j = 8 b + j.
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [k, 4 * words]
    allowed = ((as_bytes[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()  # [k, V]
    logits.index_put_((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition (prompt and output tokens), then frequency and presence (output tokens)."""
    if t.prompt_mask is not None or t.output_counts is not None:
        seen = t.output_counts > 0 if t.output_counts is not None else None
        if t.prompt_mask is not None:
            seen = t.prompt_mask if seen is None else seen | t.prompt_mask
        rep = t.repetition_penalty[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if t.output_counts is not None:
        counts = t.output_counts.to(logits.dtype)
        logits = logits - t.frequency_penalty[:, None] * counts
        logits = logits - t.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor, use_min_p: bool = True, use_k: bool = True,
                            use_p: bool = True) -> torch.Tensor:
    """Masks (to -inf) the tokens each row's min_p, top_k and top_p exclude.

    ``use_*`` = False skips a filter no row uses (rows with min_p 0, top_k 0, top_p 1 are
    unaffected either way)."""
    vocab = logits.shape[-1]
    if use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if not (use_k or use_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(-1, (vocab - k)[:, None])  # the k-th largest logit
        mask |= sorted_logits < kth
    if use_p:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        mask |= cum <= (1 - top_p[:, None])
        mask[:, -1] = False  # always keep the most likely token
    return logits.scatter(-1, order, sorted_logits.masked_fill(mask, float("-inf")))


def _exponential_noise(shape: torch.Size, like: torch.Tensor,
                       generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty(shape, dtype=like.dtype, device=like.device).exponential_()
    for row, gen in enumerate(generators):  # rows with their own seed redraw from it
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise


class Sampler:
    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        """logits: [N, V] float32 (raw model output) -> SamplerOutput."""
        raw = logits
        if t.token_bitmask is not None:
            if t.max_num_logprobs >= 0:  # logprobs are of the raw distribution
                logits = logits.clone()
            apply_token_bitmask_(logits, t.bitmask_rows, t.token_bitmask)
        if t.logit_bias is not None:
            logits = logits + t.logit_bias
        if t.banned is not None:
            logits = logits.masked_fill(t.banned, float("-inf"))
        logits = apply_penalties(logits, t)
        greedy_ids = logits.argmax(dim=-1)
        if t.all_greedy:
            token_ids = greedy_ids
        else:
            greedy = t.temperature <= 0
            temp = torch.where(greedy, torch.ones_like(t.temperature), t.temperature)
            scaled = apply_top_k_top_p_min_p(logits / temp[:, None], t.top_k, t.top_p, t.min_p,
                                             t.use_min_p, t.use_top_k, t.use_top_p)
            probs = scaled.softmax(dim=-1)
            noise = _exponential_noise(probs.shape, probs, t.generators)
            token_ids = torch.where(greedy, greedy_ids, (probs / noise).argmax(dim=-1))
        if t.max_num_logprobs < 0:
            return SamplerOutput(token_ids)
        return _with_logprobs(raw, token_ids, t.max_num_logprobs)


def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerOutput:
    logprobs = raw.log_softmax(dim=-1)
    ids, lps, ranks = gather_logprobs(logprobs, token_ids, k)
    return SamplerOutput(token_ids, ids, lps, ranks)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen token's logprob and rank, followed by the top-k. Returns ([N, 1+k] ids,
    [N, 1+k] logprobs, [N] ranks) where rank 1 = most likely."""
    chosen = logprobs.gather(-1, token_ids[:, None])  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (
        logprobs[:, :0], token_ids[:, None][:, :0])
    return (torch.cat([token_ids[:, None], top_ids], dim=1),
            torch.cat([chosen, top_lp], dim=1), ranks)
