"""The engine core's side of structured outputs and token masks (vLLM's StructuredOutputManager).

A request with a grammar waits here, outside the scheduler, until a worker thread compiled its
grammar (compiled grammars are cached by spec, so a repeated schema is ready at once); then it
gets a matcher of its own, which every token applied to the request advances. Preemption needs
nothing: a preempted request recomputes the tokens it has, it does not sample them again, so its
matcher (which has consumed them) is where it should be. ``allowed_token_ids`` and ``bad_words``
are masks too, so one bitmask per step carries all three to the sampler.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Generic, TypeVar

import numpy as np

from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.backend import (
    BatchFiller,
    Grammar,
    GrammarCompiler,
    bitmask_width,
)
from pagedllm.structured_output.bitmask import StepBitmask, clear_token, token_bitmask_row

T = TypeVar("T")
_CACHE_SIZE = 256  # compiled grammars kept (a JSON schema's is tens of kB)


def needs_mask(params: SamplingParams) -> bool:
    return bool(params.structured_outputs is not None or params.allowed_token_ids
                or params.bad_words_token_ids)


class _RequestMask:
    """What constrains one request's next token."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.grammar: Grammar | None = None
        self.allowed = (token_bitmask_row(params.allowed_token_ids, vocab_size)
                        if params.allowed_token_ids else None)
        self.bad_words = params.bad_words_token_ids


class StructuredOutputManager(Generic[T]):
    """``T``: what a request waiting for its grammar is held as (the core's request)."""

    def __init__(self, make_compiler: Callable[[], GrammarCompiler], vocab_size: int) -> None:
        """``make_compiler`` is called once, on the worker thread, when the first grammar
        comes (it reads the vocabulary: a fraction of a second)."""
        self.vocab_size = vocab_size
        self._make_compiler = make_compiler
        self._compiler: GrammarCompiler | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple[str, str, bool], Future[Any]] = OrderedDict()
        self._compiling: dict[str, tuple[T, Future[Any]]] = {}
        self._masks: dict[str, _RequestMask] = {}
        self._filler: BatchFiller | None = None

    # -- requests -------------------------------------------------------------------------

    def add(self, request_id: str, params: SamplingParams, item: T) -> bool:
        """Registers a request's masks; True if it must wait for its grammar (``ready()``
        hands ``item`` back when it is compiled)."""
        self._masks[request_id] = _RequestMask(params, self.vocab_size)
        spec = params.structured_outputs
        if spec is None:
            return False
        future = self._cache.get(spec.key)
        if future is None:
            future = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = future
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec.key)
        if future.done() and future.exception() is None:
            self._masks[request_id].grammar = Grammar(future.result())
            return False
        self._compiling[request_id] = (item, future)
        return True

    def _compile(self, spec: Any) -> Any:
        if self._compiler is None:
            self._compiler = self._make_compiler()
        return self._compiler.compile(spec)

    def ready(self) -> list[tuple[T, str | None]]:
        """The waiting requests whose grammar is compiled, with None, or with the error that
        compiling raised (then the request is forgotten)."""
        done = [(rid, item, f) for rid, (item, f) in self._compiling.items() if f.done()]
        out: list[tuple[T, str | None]] = []
        for rid, item, future in done:
            del self._compiling[rid]
            error = future.exception()
            if error is None:
                self._masks[rid].grammar = Grammar(future.result())
                out.append((item, None))
            else:
                self._masks.pop(rid, None)
                out.append((item, f"grammar compilation failed: {error}"))
        return out

    def wait(self, timeout: float) -> None:
        """Blocks until a waiting grammar is compiled or ``timeout`` seconds passed."""
        futures = [f for _, f in self._compiling.values()]
        if futures:
            wait_futures(futures, timeout, return_when="FIRST_COMPLETED")

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def free(self, request_id: str) -> None:
        self._masks.pop(request_id, None)
        self._compiling.pop(request_id, None)

    # -- steps ----------------------------------------------------------------------------

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advances the request's grammar by its new token. False when the request must end
        there: its grammar refused the token (no allowed token was left: min_tokens against a
        grammar that only allows its end), or has ended (its stop token accepted while
        ignore_eos or min_tokens kept the request going)."""
        mask = self._masks.get(request_id)
        if mask is None or mask.grammar is None:
            return True
        return mask.grammar.accept(token_id) and not mask.grammar.is_terminated

    def step_bitmask(self, rows: list[tuple[str, list[int]]]) -> StepBitmask | None:
        """The bitmask of a step's sampling rows: ``rows`` is (request id, its output tokens)
        per row, in the runner's order. None if no row has a mask."""
        masked = [(i, self._masks[rid], out) for i, (rid, out) in enumerate(rows)
                  if rid in self._masks]
        if not masked:
            return None
        return StepBitmask(np.array([i for i, _, _ in masked], np.int64),
                           self._fill([(m, out) for _, m, out in masked]))

    def _fill(self, masked: list[tuple[_RequestMask, list[int]]]) -> np.ndarray:
        bitmask = np.full((len(masked), bitmask_width(self.vocab_size)), -1, np.int32)
        grammars = [(row, m.grammar) for row, (m, _) in enumerate(masked) if m.grammar]
        if grammars:
            if self._filler is None:
                self._filler = BatchFiller()
            self._filler.fill([g for _, g in grammars], bitmask, [row for row, _ in grammars])
        for row, (m, output) in enumerate(masked):
            if m.allowed is not None:
                bitmask[row] &= m.allowed
            for word in m.bad_words:
                # A word's last token is banned where the output ends with the rest of it.
                rest = len(word) - 1
                if rest == 0 or output[-rest:] == word[:-1]:
                    clear_token(bitmask, row, word[-1])
        return bitmask
