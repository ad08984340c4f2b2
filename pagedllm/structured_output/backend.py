"""The grammar library behind structured outputs: xgrammar (vLLM's and SGLang's default).

Three things cross this interface: ``check_grammar`` (a spec is well formed: at the door, with
no vocabulary), ``GrammarCompiler.compile`` (a spec against the model's vocabulary, cached by
spec) and ``Grammar`` (one request's matcher: accept a token, fill its row of a bitmask).
xgrammar is imported on first use: it pulls in transformers, a second or two.
"""

from __future__ import annotations

import json
import re
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagedllm.tokenizer import Tokenizer

_import_lock = threading.Lock()


def _xgr() -> Any:
    with _import_lock:  # two threads importing a C extension at once can deadlock
        import xgrammar

    return xgrammar


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit j of word i: token 32 i + j allowed)."""
    return (vocab_size + 31) // 32


def _choice_regex(choices: list[str]) -> str:
    special = set(r"\.^$*+?{}[]|()/")
    return "|".join("".join("\\" + c if c in special else c for c in choice) for choice in choices)


def _json_schema_text(spec: str | dict[str, Any]) -> str:
    if isinstance(spec, dict):
        return json.dumps(spec)
    try:
        json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    return spec


def _grammar(params: StructuredOutputsParams) -> Any:
    """The spec as an xgrammar ``Grammar`` (no vocabulary): raises ValueError naming the field
    when it does not parse."""
    xgr = _xgr()
    kind = params.kind
    whitespace = {"any_whitespace": not params.disable_any_whitespace}
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(_json_schema_text(params.json), **whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False,
                                                **whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_regex(_choice_regex(params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except ValueError:
        raise
    except Exception as e:  # xgrammar's parse errors are RuntimeErrors
        lines = str(e).strip().splitlines() or [type(e).__name__]
        message = _SOURCE_PREFIX.sub("", lines[0])
        raise ValueError(f"structured_outputs.{kind} is not a valid "
                         f"{_DESCRIPTION[kind]}: {message}") from None


_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: "
_DESCRIPTION = {"json": "JSON schema", "json_object": "JSON object spec", "regex": "regex",
                "choice": "choice list", "grammar": "EBNF grammar (xgrammar's GBNF)"}


_CHECKED_LIMIT = 1024
_checked: dict[tuple[str, str, bool], None] = {}  # specs that parsed (insertion ordered)


def check_grammar(params: StructuredOutputsParams) -> None:
    """Raises ValueError (a 400 on the server) naming the field if the spec does not parse.
    A spec that parsed before is not parsed again."""
    key = params.key
    if key in _checked:
        return
    _grammar(params)
    if len(_checked) >= _CHECKED_LIMIT:
        _checked.pop(next(iter(_checked)))
    _checked[key] = None


class Grammar:
    """One request's matcher over a compiled grammar."""

    def __init__(self, compiled: Any) -> None:
        self._matcher = _xgr().GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advances by one sampled token; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The grammar has accepted its stop token: nothing may follow."""
        return bool(self._matcher.is_terminated())


class BatchFiller:
    """Fills many matchers' rows of one bitmask at once, on xgrammar's own threads."""

    def __init__(self) -> None:
        self._batch = _xgr().BatchGrammarMatcher(max_threads="auto")

    def fill(self, grammars: list[Grammar], bitmask: np.ndarray, rows: list[int]) -> None:
        """Writes each grammar's allowed next tokens into its row of ``bitmask`` ([rows,
        words] int32)."""
        self._batch.batch_fill_next_token_bitmask([g._matcher for g in grammars], bitmask, rows)


class GrammarCompiler:
    """Compiles specs against one model's vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = _xgr()
        backend, special = tokenizer.backend, tokenizer.all_special_ids
        # Special tokens are spelled empty: xgrammar then never allows them inside the output
        # (the stop tokens still end it where the grammar is complete).
        vocab = ["" if i in special else backend.id_to_token(i) or ""
                 for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                 stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (share it: ``Grammar(compiled)`` makes each request's matcher).
        The manager caches it by ``params.key``."""
        return self._compiler.compile_grammar(_grammar(params))


def compiler_for_model(model: str | None, vocab_size: int,
                       stop_token_ids: list[int]) -> GrammarCompiler:
    """The compiler for ``--model``'s vocabulary (the engine core loads no tokenizer else)."""
    from pagedllm.models.loader.source import resolve_model
    from pagedllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(model))
    stops = sorted(set(stop_token_ids) | ({tokenizer.eos_token_id} - {None}))
    return GrammarCompiler(tokenizer, vocab_size, stops)
