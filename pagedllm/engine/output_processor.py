"""OutputProcessor: sampled tokens -> RequestOutputs (text, stop strings, logprobs, timing).

Each user request has one ``RequestState``; with ``n > 1`` its samples are separate scheduler
requests (``<id>-<i>``) whose outputs are gathered here into one RequestOutput.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.request import Request, RequestStatus
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.tokenizer import Tokenizer
from pagedllm.worker.model_runner import LogprobsEntry


@dataclass(slots=True)
class SampleState:
    """One sample (one scheduler request) of a user request."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    num_fed: int = 0  # output tokens given to the detokenizer
    sent_tokens: int = 0  # tokens already returned (DELTA mode)
    sent_logprobs: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent_prompt_logprobs: bool = False
    num_cached_tokens: int = 0
    pending: set[int] = field(default_factory=set)  # samples with news to report
    num_finished: int = 0  # samples with a finish reason
    # From params, read per token: whether outputs come before the end, and only what is new.
    streams: bool = False
    delta: bool = False

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._news = False  # some state has pending news (make_outputs skips the scan if not)
        # Samples whose text can wait until they finish (FINAL_ONLY, without stop strings or
        # logprobs): the engine skips on_token for their tokens between the first and the last.
        self.deferred: set[str] = set()
        # Texts of single tokens, per (skip_special_tokens, spaces_between_special_tokens).
        self._token_texts: dict[tuple[bool, bool], dict[int, str]] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request],
            params: SamplingParams, arrival_time: float) -> None:
        token_texts = self._token_texts.setdefault(
            (params.skip_special_tokens, params.spaces_between_special_tokens), {})
        samples = [SampleState(
            i, child, IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids,
                                             child.sampling_params, token_texts),
            [] if params.logprobs is not None else None,
            0.0 if params.logprobs is not None else None) for i, child in enumerate(children)]
        kind = params.output_kind
        self.states[request_id] = RequestState(
            request_id, prompt, children[0].prompt_token_ids, params, samples,
            RequestMetrics(arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            streams=kind != RequestOutputKind.FINAL_ONLY, delta=kind == RequestOutputKind.DELTA)
        if (params.output_kind == RequestOutputKind.FINAL_ONLY and not params.stop
                and params.logprobs is None):
            self.deferred.update(child.request_id for child in children)

    def add_prompt_logprobs(self, request_id: str, entries: list[LogprobsEntry]) -> None:
        state = self.states[request_id]
        expected = len(state.prompt_token_ids)
        assert state.prompt_logprobs is not None
        for entry in entries:  # a recomputed (preempted) prompt does not add them twice
            if len(state.prompt_logprobs) < expected:
                state.prompt_logprobs.append(self._logprob_dict(entry))

    def on_token(self, request_id: str, index: int, logprobs: LogprobsEntry | None,
                 now: float) -> str | None:
        """Processes a sample's newest token (and those the engine deferred before it);
        returns the stop string it completed, if any."""
        state = self.states[request_id]
        sample = state.samples[index]
        req = sample.request
        params = req.sampling_params
        tokens = req.output_token_ids
        num_tokens = end = len(tokens)
        # A stop token (EOS or stop_token_ids) ends the text before it, as in vLLM.
        if req.status is RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output:
            end -= 1
        stop = sample.detokenizer.update(tokens[sample.num_fed:end],
                                         num_tokens >= params.min_tokens)
        sample.num_fed = num_tokens
        if logprobs is not None and sample.logprobs is not None:
            sample.logprobs.append(self._logprob_dict(logprobs))
            sample.cumulative_logprob += logprobs[1][0]
        m = state.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        # A FINAL_ONLY request has nothing to report until a sample finishes (finish_sample).
        if state.streams:
            state.pending.add(index)
            self._news = True
        return stop

    def on_scheduled(self, request_id: str, req: Request, now: float) -> None:
        state = self.states[request_id]
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = now
            state.num_cached_tokens = max(req.num_cached_tokens, 0)

    def finish_sample(self, request_id: str, index: int, reason: str,
                      stop_reason: int | str | None) -> None:
        state = self.states[request_id]
        sample = state.samples[index]
        if sample.finish_reason is None:
            sample.finish_reason, sample.stop_reason = reason, stop_reason
            state.num_finished += 1
            state.pending.add(index)
            self._news = True

    def make_outputs(self, now: float) -> list[RequestOutput]:
        """RequestOutputs for the requests with news; finished ones are forgotten."""
        outputs: list[RequestOutput] = []
        if not self._news:
            return outputs
        self._news = False
        for state in [s for s in self.states.values() if s.pending]:
            finished = state.finished
            if state.streams or finished:
                outputs.append(self._make_output(state, finished, now))
            state.pending.clear()
            if finished:
                self._forget(state.request_id)
        return outputs

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
        tokens = sample.request.output_token_ids
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

    def abort(self, request_id: str) -> None:
        if request_id in self.states:
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        for sample in self.states.pop(request_id).samples:
            self.deferred.discard(sample.request.request_id)
