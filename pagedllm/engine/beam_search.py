"""Beam search as vLLM does it: rounds of one-token requests over the plain engine.

Each round sends every live beam (prompt + its tokens so far) as a request for one token with
``logprobs=2 * beam_width``; prefix caching makes re-sending the growing beams cheap. A beam's
candidates are the returned logprobs (the top ``2 * beam_width`` plus the sampled token); the best
``beam_width`` by cumulative logprob live on, and a candidate ending in EOS moves to the completed
list (unless ``ignore_eos``). At the end completed and live beams are ranked by
``cum_logprob / len(tokens incl. prompt, minus a final EOS) ** length_penalty``.

This module holds the algorithm only (no I/O): ``LLM.beam_search`` and the OpenAI server drive
the same ``BeamBatch`` through their own engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedllm.outputs import CompletionOutput, Logprob
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters; validated at construction (``ValueError`` names the
    field)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")


@dataclass
class BeamSearchSequence:
    """One beam. ``tokens`` are the prompt's and the generated ones (a final EOS included, as in
    vLLM's offline API); ``logprobs`` has one entry per generated token."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | str | None = None  # the EOS id, for a beam that EOS ended (vLLM's)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.tokens) - len(self.logprobs)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_token_id: int | None,
               length_penalty: float = 1.0) -> float:
    """vLLM's (and transformers') length-normalised score; a final EOS does not count."""
    length = len(tokens)
    if tokens and tokens[-1] == eos_token_id:
        length -= 1
    return cum_logprob / (length ** length_penalty)


def round_params(params: BeamSearchParams, logprobs: int | None = None) -> SamplingParams:
    """One round's request per beam: one token and its candidates. ``logprobs`` asks for more
    than ``2 * beam_width`` (to show them); the search itself still uses only that many."""
    return SamplingParams(max_tokens=1, temperature=params.temperature,
                          logprobs=max(2 * params.beam_width, logprobs or 0),
                          output_kind=RequestOutputKind.FINAL_ONLY)


class BeamSearch:
    """One prompt's search: the live beams, the completed ones, and the rounds done."""

    def __init__(self, prompt_token_ids: Sequence[int], params: BeamSearchParams,
                 eos_token_id: int | None) -> None:
        self.params = params
        self.eos_token_id = eos_token_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.beams = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.rounds = 0

    @property
    def finished(self) -> bool:
        return not self.beams or self.rounds >= self.params.max_tokens

    def advance(self, outputs: Sequence[CompletionOutput | None]) -> None:
        """Takes one round's output for each live beam (in ``self.beams`` order). An output
        without logprobs (aborted, or an engine error) ends its beam, as in vLLM."""
        assert len(outputs) == len(self.beams), "one output per live beam"
        p = self.params
        eos = None if p.ignore_eos else self.eos_token_id
        candidates: list[BeamSearchSequence] = []
        for beam, out in zip(self.beams, outputs):
            if out is None or not out.logprobs:
                continue
            step = out.logprobs[0]
            sampled = out.token_ids[0] if out.token_ids else None
            for token_id, lp in step.items():
                # Only the top 2 * beam_width and the sampled token are candidates, however
                # many logprobs the caller asked to see.
                if token_id != sampled and lp.rank is not None and lp.rank > 2 * p.beam_width:
                    continue
                new = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [step],
                                         beam.cum_logprob + lp.logprob)
                if token_id == eos:
                    new.finish_reason, new.stop_reason = "stop", token_id
                    self.completed.append(new)
                else:
                    candidates.append(new)
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)  # stable: ties keep order
        self.beams = candidates[:p.beam_width]
        self.rounds += 1

    def best(self) -> list[BeamSearchSequence]:
        """The best ``beam_width`` of the completed and live beams by score, best first."""
        for beam in self.beams:
            beam.finish_reason = "length"
        p = self.params
        ranked = sorted(self.completed + self.beams, reverse=True, key=lambda b: beam_score(
            b.tokens, b.cum_logprob, self.eos_token_id, p.length_penalty))
        return ranked[:p.beam_width]


class BeamBatch:
    """Several prompts' searches advanced together: each round is one batch of requests."""

    def __init__(self, searches: Sequence[BeamSearch]) -> None:
        self.searches = list(searches)
        self._live: list[BeamSearch] = []

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.searches)

    def requests(self) -> list[list[int]]:
        """This round's prompts (token ids), one per live beam of every unfinished search."""
        self._live = [s for s in self.searches if not s.finished]
        return [beam.tokens for s in self._live for beam in s.beams]

    def advance(self, outputs: Sequence[CompletionOutput | None]) -> None:
        """Takes the outputs of the last ``requests()``, in the same order."""
        assert len(outputs) == sum(len(s.beams) for s in self._live)
        start = 0
        for s in self._live:
            end = start + len(s.beams)
            s.advance(outputs[start:end])
            start = end
