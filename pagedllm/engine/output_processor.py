"""OutputProcessor: the core's token ids -> RequestOutputs (text, stop strings, logprobs, timing).

It runs in the front end and keeps everything about a request that the core does not need: its
tokens as text, its stop strings, its logprobs as dicts, its timing. Each user request has one
``RequestState``; with ``n > 1`` its samples are separate scheduler requests (see
``parallel_sampling``) gathered here into one RequestOutput: this is the one map from a scheduler
request to its user request and sample index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    LogprobsEntry,
)
from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.tokenizer import Tokenizer


@dataclass(slots=True)
class SampleState:
    """One sample (one scheduler request) of a user request."""

    parent: RequestState
    index: int
    core_id: str  # its scheduler request id
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    # Text waits until the sample ends (FINAL_ONLY, without stop strings or logprobs).
    deferred: bool
    token_ids: list[int] = field(default_factory=list)
    num_fed: int = 0  # output tokens given to the detokenizer
    sent_tokens: int = 0  # tokens already returned (DELTA mode)
    sent_logprobs: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prefilling: bool = True  # no token yet: its prompt counts in num_prefill_tokens


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[SampleState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent_prompt_logprobs: bool = False
    num_cached_tokens: int = 0
    pending: set[int] = field(default_factory=set)  # samples with news to report
    num_finished: int = 0  # samples with a finish reason
    error: str | None = None  # a sample failed in the core
    # From params: whether outputs come before the end, and only what is new.
    streams: bool = False
    delta: bool = False

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.samples)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]
    # Scheduler requests the core must end: a stop string ended them here.
    to_abort: list[str]
    # Requests that failed in the core (their outputs are in ``outputs``, finish reason "error").
    errors: dict[str, str]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._samples: dict[str, SampleState] = {}  # scheduler request id -> its sample
        # Texts of single tokens, per (skip_special_tokens, spaces_between_special_tokens).
        self._token_texts: dict[tuple[bool, bool], dict[int, str]] = {}
        # What admission control counts (vLLM's): samples not finished, and the prompt tokens
        # of those without a token yet (the whole prompt: chunks and prefix hits done in the
        # core are not seen here, so the count errs on the side of refusing).
        self.num_unfinished_samples = 0
        self.num_prefill_tokens = 0

    def is_in_use(self, request_id: str, samples: list[EngineCoreRequest]) -> bool:
        return request_id in self.states or any(s.request_id in self._samples for s in samples)

    def add(self, request_id: str, prompt: str | None, params: SamplingParams,
            samples: list[EngineCoreRequest], arrival_time: float) -> None:
        token_texts = self._token_texts.setdefault(
            (params.skip_special_tokens, params.spaces_between_special_tokens), {})
        kind = params.output_kind
        prompt_ids = samples[0].prompt_token_ids
        state = RequestState(
            request_id, prompt, prompt_ids, params, RequestMetrics(arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            streams=kind != RequestOutputKind.FINAL_ONLY, delta=kind == RequestOutputKind.DELTA)
        deferred = (kind == RequestOutputKind.FINAL_ONLY and not params.stop
                    and params.logprobs is None)
        with_logprobs = params.logprobs is not None
        for i, sample in enumerate(samples):
            state.samples.append(SampleState(
                state, i, sample.request_id,
                IncrementalDetokenizer(self.tokenizer, prompt_ids, sample.sampling_params,
                                       token_texts),
                [] if with_logprobs else None, 0.0 if with_logprobs else None, deferred))
            self._samples[sample.request_id] = state.samples[-1]
        self.states[request_id] = state
        self.num_unfinished_samples += len(samples)
        self.num_prefill_tokens += len(prompt_ids) * len(samples)

    def abort(self, request_id: str) -> list[str]:
        """Forgets a user request; returns its scheduler requests (for the core to abort)."""
        state = self.states.get(request_id)
        if state is None:
            return []
        self._forget(state)
        return [s.core_id for s in state.samples if s.finish_reason is None]

    def process(self, message: EngineCoreOutputs, now: float) -> ProcessedOutputs:
        """Applies one step's message; returns the RequestOutputs with news."""
        result = ProcessedOutputs([], [], {})
        for core_id, num_cached in message.first_scheduled:
            sample = self._samples.get(core_id)
            if sample is not None and sample.parent.metrics.first_scheduled_time is None:
                sample.parent.metrics.first_scheduled_time = message.timestamp
                sample.parent.num_cached_tokens = num_cached
        touched: dict[str, RequestState] = {}
        for out in message.outputs:
            sample = self._samples.get(out.request_id)
            if sample is None or sample.finish_reason is not None:
                continue  # aborted, or ended here by a stop string while this step ran
            state = sample.parent
            if self._update(sample, out, now):
                result.to_abort.append(out.request_id)
            if out.error is not None and state.error is None:
                state.error = result.errors[state.request_id] = out.error
            touched[state.request_id] = state
        for state in touched.values():
            finished = state.finished
            if state.pending and (state.streams or finished):
                result.outputs.append(self._make_output(state, finished, now))
            state.pending.clear()
            if finished:
                self._forget(state)
        return result

    def _update(self, sample: SampleState, out: EngineCoreOutput, now: float) -> bool:
        """Takes a sample's new tokens; True if a stop string ended it here."""
        state = sample.parent
        if out.new_prompt_logprobs and state.prompt_logprobs is not None:
            self._add_prompt_logprobs(state, out.new_prompt_logprobs)
        if out.new_token_ids:
            sample.token_ids += out.new_token_ids
            self._end_prefill(sample)
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if sample.logprobs is not None and out.new_logprobs:
                for entry in out.new_logprobs:
                    sample.logprobs.append(self._logprob_dict(entry))
                    sample.cumulative_logprob += entry[1][0]
        stopped = False
        if out.finish_reason is not None:
            self._finish(sample, str(out.finish_reason), out.stop_reason)
        elif out.new_token_ids and not (sample.deferred and len(sample.token_ids) > 1):
            # A deferred sample's text is made when it ends; its first token still reports,
            # for the time to first token.
            stop = self._detokenize(sample)
            if stop is not None:
                self._finish(sample, "stop", stop)
                stopped = True
        if state.streams or sample.finish_reason is not None:
            state.pending.add(sample.index)
        return stopped

    def _detokenize(self, sample: SampleState) -> str | None:
        """Feeds the sample's new tokens to its detokenizer; returns a stop string it hit."""
        params, tokens = sample.detokenizer.params, sample.token_ids
        end = len(tokens)
        # A stop token (EOS or stop_token_ids) ends the text before it, as in vLLM.
        if sample.finish_reason == "stop" and not params.include_stop_str_in_output:
            end -= 1
        stop = sample.detokenizer.update(tokens[sample.num_fed:end],
                                         len(tokens) >= params.min_tokens)
        sample.num_fed = len(tokens)
        return stop

    def _finish(self, sample: SampleState, reason: str, stop_reason: int | str | None) -> None:
        if sample.finish_reason is None:
            sample.finish_reason, sample.stop_reason = reason, stop_reason
            sample.parent.num_finished += 1
            self.num_unfinished_samples -= 1
            self._end_prefill(sample)
        if sample.num_fed < len(sample.token_ids):
            stop = self._detokenize(sample)  # a stop string in the last text still cuts it
            if stop is not None and reason != "error":
                sample.finish_reason, sample.stop_reason = "stop", stop

    def _add_prompt_logprobs(self, state: RequestState, entries: list[LogprobsEntry]) -> None:
        assert state.prompt_logprobs is not None
        expected = len(state.prompt_token_ids)
        for entry in entries:  # a recomputed (preempted) prompt does not add them twice
            if len(state.prompt_logprobs) < expected:
                state.prompt_logprobs.append(self._logprob_dict(entry))

    def _make_output(self, state: RequestState, finished: bool, now: float) -> RequestOutput:
        delta, samples = state.delta, state.samples
        if len(samples) == 1:  # pending is {0}
            completions = [self._completion(samples[0], delta)]
        else:
            chosen = sorted(state.pending) if delta else range(len(samples))
            completions = [self._completion(samples[i], delta) for i in chosen]
        if finished:
            state.metrics.finished_time = now
        prompt_logprobs = state.prompt_logprobs
        if delta and state.sent_prompt_logprobs:
            prompt_logprobs = None
        state.sent_prompt_logprobs = True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                             completions, finished, prompt_logprobs, state.num_cached_tokens,
                             state.metrics)

    def _completion(self, sample: SampleState, delta: bool) -> CompletionOutput:
        tokens = sample.token_ids
        done = sample.finish_reason is not None
        text = sample.detokenizer.get_next_output_text(done, delta)
        logprobs = sample.logprobs
        if delta:
            token_ids = tokens[sample.sent_tokens:]
            if logprobs is not None:
                logprobs = logprobs[sample.sent_logprobs:]
                sample.sent_logprobs += len(logprobs)
            sample.sent_tokens = len(tokens)
        else:
            token_ids = list(tokens)
        return CompletionOutput(sample.index, text, token_ids, sample.cumulative_logprob,
                                logprobs, sample.finish_reason, sample.stop_reason)

    def _logprob_dict(self, entry: LogprobsEntry) -> dict[int, Logprob]:
        ids, lps, rank = entry
        out = {ids[0]: Logprob(lps[0], rank, self.tokenizer.decode([ids[0]],
                                                                    skip_special_tokens=False))}
        for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, r, self.tokenizer.decode([tid], skip_special_tokens=False))
        return out

    def _end_prefill(self, sample: SampleState) -> None:
        if sample.prefilling:
            sample.prefilling = False
            self.num_prefill_tokens -= len(sample.parent.prompt_token_ids)

    def _forget(self, state: RequestState) -> None:
        self.states.pop(state.request_id, None)
        for sample in state.samples:
            self._samples.pop(sample.core_id, None)
            if sample.finish_reason is None:  # aborted
                self.num_unfinished_samples -= 1
                self._end_prefill(sample)
