"""Admission control (vLLM's ``--max-num-queued-reqs`` / ``--max-num-queued-tokens``) without an
engine: the front end's counts (``OutputProcessor``) and the check made at the door."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.engine.async_llm import AsyncLLM, MaxQueuedTokensError, QueueOverflowError
from pagedllm.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    FinishReason,
)
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer

STATS = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def _add(op: OutputProcessor, request_id: str, prompt_len: int, n: int = 1) -> list[str]:
    params = SamplingParams(max_tokens=4, n=n)
    ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
    samples = [EngineCoreRequest(i, list(range(10, 10 + prompt_len)), params, 0.0) for i in ids]
    op.add(request_id, None, params, samples, 0.0)
    return ids


def _step(op: OutputProcessor, *outputs: EngineCoreOutput) -> None:
    op.process(EngineCoreOutputs(list(outputs), STATS, 0.0), 0.0)


def test_counts_follow_the_requests_life(default_tokenizer: Tokenizer) -> None:
    op = OutputProcessor(default_tokenizer)
    _add(op, "a", 30)
    b0, b1, b2 = _add(op, "b", 20, n=3)
    assert (op.num_unfinished_samples, op.num_prefill_tokens) == (4, 30 + 3 * 20)
    # A first token ends a sample's prefill (the whole prompt leaves the count at once).
    _step(op, EngineCoreOutput("a", [5]), EngineCoreOutput(b0, [5]))
    assert (op.num_unfinished_samples, op.num_prefill_tokens) == (4, 2 * 20)
    # A sample that ends leaves both counts, tokens or not (an error before its first token).
    _step(op, EngineCoreOutput(b1, finish_reason=FinishReason.ERROR, error="boom"))
    assert (op.num_unfinished_samples, op.num_prefill_tokens) == (3, 20)
    _step(op, EngineCoreOutput("a", [2], finish_reason=FinishReason.STOP))
    assert (op.num_unfinished_samples, op.num_prefill_tokens) == (2, 20)
    # Aborting the rest of b: nothing left.
    assert sorted(op.abort("b")) == sorted([b0, b2])
    assert (op.num_unfinished_samples, op.num_prefill_tokens) == (0, 0)


def _front_end(unfinished: int, prefill_tokens: int, **limits: int) -> AsyncLLM:
    """An AsyncLLM with only what the check reads (no engine)."""
    llm = AsyncLLM.__new__(AsyncLLM)
    llm.frontend = SimpleNamespace(  # type: ignore[assignment]
        config=SimpleNamespace(scheduler=SchedulerConfig(**limits)),
        output_processor=SimpleNamespace(num_unfinished_samples=unfinished,
                                         num_prefill_tokens=prefill_tokens))
    return llm


def _group(*ns: int) -> list[tuple[str, str, SamplingParams]]:
    return [(f"r{i}", "hi", SamplingParams(n=n)) for i, n in enumerate(ns)]


def test_no_limits_admit_everything() -> None:
    _front_end(10**6, 10**9)._check_admission(_group(1))


def test_max_num_queued_reqs_counts_samples() -> None:
    _front_end(7, 0, max_num_queued_reqs=10)._check_admission(_group(3))
    with pytest.raises(QueueOverflowError):
        _front_end(8, 0, max_num_queued_reqs=10)._check_admission(_group(3))
    with pytest.raises(QueueOverflowError):  # a group counts whole (prompts x n)
        _front_end(6, 0, max_num_queued_reqs=10)._check_admission(_group(2, 3))
    with pytest.raises(QueueOverflowError):
        _front_end(0, 0, max_num_queued_reqs=0)._check_admission(_group(1))


def test_max_num_queued_tokens_refuses_once_reached() -> None:
    # vLLM's check: the backlog already at the limit, whatever the new prompt's length.
    _front_end(1, 999, max_num_queued_tokens=1000)._check_admission(_group(1))
    with pytest.raises(MaxQueuedTokensError):
        _front_end(1, 1000, max_num_queued_tokens=1000)._check_admission(_group(1))
    with pytest.raises(MaxQueuedTokensError):
        _front_end(0, 0, max_num_queued_tokens=0)._check_admission(_group(1))


def test_the_request_limit_is_checked_first() -> None:
    with pytest.raises(QueueOverflowError):
        _front_end(10, 1000, max_num_queued_reqs=10,
                   max_num_queued_tokens=1000)._check_admission(_group(1))


def test_messages_and_limits_are_vllms() -> None:
    assert str(QueueOverflowError()) == (
        "The engine is currently busy and cannot accept new requests. Please try again later "
        "or on a different instance.")
    assert str(MaxQueuedTokensError()) == (
        "The engine has reached its prefill token backlog limit. Please try again later or on "
        "a different instance.")
    with pytest.raises(ValueError, match="max_num_queued_reqs must be >= 0"):
        SchedulerConfig(max_num_queued_reqs=-1)
    with pytest.raises(ValueError, match="scheduling_policy"):
        SchedulerConfig(scheduling_policy="sjf")
