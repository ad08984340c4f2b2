"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's fields)."""

from __future__ import annotations

import enum
import json as json_module
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.tokenizer import Tokenizer

_GREEDY_EPS = 1e-5
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


@dataclass
class StructuredOutputsParams:
    """Constrains a request's output to a grammar (vLLM's names). Exactly one of ``json`` (a
    JSON schema, as a dict or a JSON string), ``json_object`` (any JSON object), ``regex``,
    ``choice`` (one of these strings) and ``grammar`` (an EBNF grammar, xgrammar's GBNF
    dialect) is set. ``disable_any_whitespace`` makes JSON compact (no free whitespace)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        kinds = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, "
                             f"choice and grammar; got {kinds or 'none'}.")
        if self.choice is not None and (not self.choice or not all(
                isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings.")

    @property
    def kind(self) -> str:
        return next(name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, spec, compact): what a compiled grammar is cached by."""
        spec = getattr(self, self.kind)
        if isinstance(spec, (dict, list)):
            spec = json_module.dumps(spec, sort_keys=True)
        return self.kind, str(spec), self.disable_any_whitespace


_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all text and tokens so far (offline API)
    DELTA = 1  # every output carries only what is new since the last one (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """Validated at construction: a bad value raises ``ValueError`` naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words never generated (each as its token sequence)
    # Filled by the engine from the tokenizer (EOS) and the model's generation config.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled by the front end from bad_words: each word's token ids, with and without a space.
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.n >= 1, f"n must be at least 1, got {self.n}."),
            (self.temperature >= 0.0,
             f"temperature must be non-negative, got {self.temperature}."),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}."),
            (self.top_k >= 0,
             f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}."),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}."),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}."),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}."),
            (self.repetition_penalty > 0.0,
             f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be at least 1, got {self.max_tokens}."),
            (self.min_tokens >= 0,
             f"min_tokens must be greater than or equal to 0, got {self.min_tokens}."),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
             f"got {self.min_tokens}."),
            (self.logprobs is None or self.logprobs >= 0,
             f"logprobs must be non-negative, got {self.logprobs}."),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}."),
            (all(s for s in self.stop), "stop strings must not be empty."),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers."),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED),
             f"seed must be an integer in [0, 2**64 - 1], got {self.seed}."),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "allowed_token_ids is not allowed to be empty."),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words or []),
             "bad_words must be non-empty strings."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def check_limits(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks the fields whose bounds depend on the engine (model vocabulary, config)."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise ValueError(f"Requested {name} of {value}, which is greater than max "
                                 f"allowed: {max_logprobs}.")
        for token_id in (self.logit_bias or {}):
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias has token_id {token_id} out of vocabulary "
                                 f"range [0, {vocab_size}).")
        for token_id in (self.allowed_token_ids or []):
            if not (isinstance(token_id, int) and 0 <= token_id < vocab_size):
                raise ValueError(f"allowed_token_ids has token_id {token_id} out of vocabulary "
                                 f"range [0, {vocab_size}).")
        if self.structured_outputs is not None:
            from pagedllm.structured_output.backend import check_grammar

            check_grammar(self.structured_outputs)

    def update_from_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Tokenizes ``bad_words`` (as vLLM: each word alone and after a space, as it would
        appear mid-text) into ``bad_words_token_ids``."""
        words: list[list[int]] = []
        for word in self.bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in words:
                    words.append(ids)
        self.bad_words_token_ids = words

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
