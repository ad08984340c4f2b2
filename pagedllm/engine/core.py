"""EngineCore: token ids in, token ids out, one ``step()`` at a time.

It owns the scheduler, the KV cache manager and the executor (the model runner, or one per
tensor-parallel rank, ``engine.executor``); it knows no text, no tokenizer
and no HTTP. ``step()`` = schedule -> launch the model -> apply the sampled tokens (token-level stop
rules: EOS, stop token ids, length) -> one ``EngineCoreOutputs``. With async scheduling (on a GPU)
the tokens applied are the previous step's, while this one runs. ``engine.core_proc`` runs it in
a process of its own; ``engine.core_client`` drives it from the front end, here or there.

One request's failure is its own: if launching a step fails, each of its requests is run again
alone, and only those that fail alone end, with ``FinishReason.ERROR``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from pagedllm.engine.messages import (
    EngineCoreInfo,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    FinishReason,
)
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.backend import compiler_for_model
from pagedllm.structured_output.bitmask import StepBitmask
from pagedllm.structured_output.manager import StructuredOutputManager, needs_mask
from pagedllm.worker.model_runner import LaunchedStep, ModelRunner, ModelRunnerOutput

if TYPE_CHECKING:
    from pagedllm.engine.executor import UniProcExecutor

logger = logging.getLogger(__name__)

_REASONS = {RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
            RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
            RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
            RequestStatus.FINISHED_ERROR: FinishReason.ERROR}


class EngineCore:
    def __init__(self, config: EngineConfig, executor: UniProcExecutor, num_blocks: int,
                 sliding_window: int = 0) -> None:
        """``sliding_window``: every attention layer's window (0: full attention somewhere);
        the KV cache manager frees the blocks a request's queries no longer reach."""
        self.config = config
        self.executor = executor
        flag = config.scheduler.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if flag is None else flag
        self.kv_cache = KVCacheManager(num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching, sliding_window)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        # Requests whose sampling reads their latest tokens on the host (penalties, min_tokens,
        # logprobs): while any is unfinished, each step completes before the next is scheduled.
        self._exact: set[str] = set()
        # Grammars (compiled off this loop), allowed_token_ids and bad_words: one token bitmask
        # a step. A request waits there, not in the scheduler, until its grammar is compiled.
        arch = self.runner.arch
        self.structured: StructuredOutputManager[Request] = StructuredOutputManager(
            functools.partial(compiler_for_model, config.model.model, arch.vocab_size,
                              list(arch.eos_token_ids)), arch.vocab_size)
        self._failed: list[EngineCoreOutput] = []  # requests refused on add, reported next step
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_step = (0, 0)

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> EngineCore:
        """Loads the model and sizes the KV cache (``pagedllm.config`` field names)."""
        from pagedllm.engine.builder import build_core

        return build_core(kwargs)

    @property
    def runner(self) -> ModelRunner:
        """This process's model runner (rank 0's with tensor parallelism)."""
        return self.executor.runner

    @property
    def info(self) -> EngineCoreInfo:
        return EngineCoreInfo(self.kv_cache.pool.num_blocks, self.kv_cache.block_size)

    # -- requests -------------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queues a request the front end validated; one the core cannot take ends with an error
        in the next step's outputs."""
        rid = request.request_id
        try:
            # The scheduler also knows a finished request whose last token is still in flight:
            # its id is not free yet.
            if rid in self.scheduler.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            sibling = self.scheduler.requests.get(request.wait_for) if request.wait_for else None
            req = Request(rid, request.prompt_token_ids, request.sampling_params,
                          request.arrival_time, request.priority, wait_for=sibling,
                          images=request.images, mrope=request.mrope)
            if not (needs_mask(request.sampling_params)
                    and self.structured.add(rid, request.sampling_params, req)):
                self.scheduler.add_request(req)
        except Exception as e:
            logger.warning("Request %s refused by the engine core: %s", rid, e)
            self._failed.append(EngineCoreOutput(rid, finish_reason=FinishReason.ERROR,
                                                 error=f"{type(e).__name__}: {e}"))
            return
        if _reads_token_history(request.sampling_params):
            self._exact.add(rid)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Ends the requests now and frees their KV blocks; no output is sent for them."""
        for rid in request_ids:
            self.structured.free(rid)  # also drops one still waiting for its grammar
            req = self._live(rid)
            if req is None:
                self._exact.discard(rid)
            else:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self._forget(req)

    def _live(self, request_id: str) -> Request | None:
        """The request if it is unfinished."""
        req = self.scheduler.requests.get(request_id)
        return None if req is None or req.is_finished else req

    def _forget(self, req: Request) -> None:
        self._exact.discard(req.request_id)
        self.structured.free(req.request_id)
        self.executor.free_request(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.num_unfinished > 0 or self._in_flight is not None
                or bool(self._failed) or self.structured.num_compiling > 0)

    # -- the step -------------------------------------------------------------------------

    def step(self) -> EngineCoreOutputs:
        """One step. With async scheduling, the step is launched on the GPU and the outputs
        returned are the previous step's, made while this one runs."""
        outputs, self._failed = self._failed, []
        first: list[tuple[str, int]] = []
        if self._in_flight is not None and self._exact:
            outputs += self._finish_in_flight()  # the next step's sampling needs these tokens
            return self._message(outputs, first)
        self._admit_compiled()
        sched = self.scheduler.schedule()
        self._last_step = (len(sched.scheduled), sched.total_num_tokens)
        if sched.is_empty:
            outputs += self._finish_in_flight()
            return self._message(outputs, first)
        for s in sched.scheduled:
            req = self.scheduler.requests[s.request_id]
            prompt_left = req.num_prompt_tokens - s.num_computed_tokens
            if prompt_left > 0:  # a prompt chunk (a request's first step is always one)
                self._prompt_tokens += min(prompt_left, s.num_new_tokens)
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                    first.append((req.request_id, max(req.num_cached_tokens, 0)))
        try:
            launched = self.executor.launch(sched, self._token_masks(sched.scheduled))
        except Exception as e:
            if not self.executor.retry_failed_steps:
                raise
            outputs += self._finish_in_flight()
            outputs += self._run_alone(sched, e)
            return self._message(outputs, first)
        outputs += self._finish_in_flight()
        self._in_flight = (sched, launched)
        if not self.async_scheduling or self._exact:
            outputs += self._finish_in_flight()
        return self._message(outputs, first)

    def _admit_compiled(self) -> None:
        """Hands the requests whose grammar is compiled to the scheduler (waits a little for
        one when nothing else is left to run)."""
        if not self.structured.num_compiling:
            return
        if not self.scheduler.num_unfinished and self._in_flight is None:
            self.structured.wait(0.05)
        for req, error in self.structured.ready():
            if error is None:
                self.scheduler.add_request(req)
            else:
                self._exact.discard(req.request_id)
                self._failed.append(EngineCoreOutput(
                    req.request_id, finish_reason=FinishReason.ERROR, error=error))

    def state_message(self) -> EngineCoreOutputs:
        """The core's counters between steps (after aborts freed blocks)."""
        return EngineCoreOutputs([], self.get_stats(), time.monotonic(), is_step=False)

    def _message(self, outputs: list[EngineCoreOutput],
                 first: list[tuple[str, int]]) -> EngineCoreOutputs:
        return EngineCoreOutputs(outputs, self.get_stats(), time.monotonic(), first)

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        """Waits for the step in flight (if any) and applies its tokens."""
        if self._in_flight is None:
            return []
        sched, launched = self._in_flight
        self._in_flight = None
        try:
            result = launched.result()
        except Exception as e:  # the device failed after launch: the step's requests end
            logger.exception("A step failed on the device; ending its %d requests",
                             len(sched.scheduled))
            return [self._fail(s, e) for s in sched.scheduled if self._live(s.request_id)]
        return self._apply(sched, result)

    def _apply(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs: dict[str, EngineCoreOutput] = {}
        for rid, entries in result.prompt_logprobs:  # before the update may finish the request
            if self._live(rid):
                outputs[rid] = EngineCoreOutput(rid, new_prompt_logprobs=entries)
        progressed = self.scheduler.update_from_output(sched, result.sampled_token_ids)
        self._generation_tokens += len(progressed)
        logprobs = dict(zip(result.req_ids, result.logprobs)) if result.logprobs else {}
        for req in progressed:
            rid = req.request_id
            if not self.structured.accept(rid, req.output_token_ids[-1]) and \
                    not req.is_finished:  # its structured output is as complete as it gets
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            out = outputs.get(rid) or EngineCoreOutput(rid)
            outputs[rid] = out
            out.new_token_ids = [req.output_token_ids[-1]]
            entry = logprobs.get(rid)
            if entry is not None:
                out.new_logprobs = [entry]
            if req.is_finished:
                out.finish_reason = _REASONS[req.status]
                out.stop_reason = req.stop_reason
                self._forget(req)
        return list(outputs.values())

    def _token_masks(self, scheduled: list[ScheduledRequest],
                     ) -> Callable[[], StepBitmask | None]:
        """What fills the token masks of the sampling rows of ``scheduled`` (the runner calls
        it once the step's forward is queued)."""
        rows = [(s.request_id, self.scheduler.requests[s.request_id].output_token_ids)
                for s in scheduled if s.samples]
        return functools.partial(self.structured.step_bitmask, rows)

    def _run_alone(self, sched: SchedulerOutput, error: Exception) -> list[EngineCoreOutput]:
        """Launching ``sched`` raised: runs each of its requests in a step of its own, so that
        only a request that fails alone ends (with the error it raised)."""
        live = [s for s in sched.scheduled if self._live(s.request_id)]
        if len(sched.scheduled) == 1:
            logger.error("A step of one request failed", exc_info=error)
            return [self._fail(s, error) for s in live]
        logger.warning("A step of %d requests failed (%s: %s); running each alone",
                       len(sched.scheduled), type(error).__name__, error)
        outputs: list[EngineCoreOutput] = []
        for s in live:
            # The token the step before was sampling for it is known now (applied above).
            req, start = self.scheduler.requests[s.request_id], s.num_computed_tokens
            s = msgspec.structs.replace(s, token_ids=req.token_ids(
                start, min(start + s.num_new_tokens, req.num_tokens)))
            new = [d for d in sched.new_requests if d.request_id == s.request_id]
            alone = SchedulerOutput(scheduled=[s], new_requests=new)
            try:
                result = self.executor.launch(alone, self._token_masks([s])).result()
            except Exception as e:
                logger.exception("Request %s failed", s.request_id)
                outputs.append(self._fail(s, e))
                continue
            outputs += self._apply(alone, result)
        return outputs

    def _fail(self, s: ScheduledRequest, error: BaseException) -> EngineCoreOutput:
        """Ends the request of a failed step's row with the error."""
        req = self.scheduler.requests[s.request_id]
        req.num_pending -= s.samples  # the failed step's token never comes
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        self._forget(req)
        return EngineCoreOutput(req.request_id, finish_reason=FinishReason.ERROR,
                                error=f"{type(error).__name__}: {error}")

    def get_stats(self) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_running_reqs=len(self.scheduler.running),
            num_waiting_reqs=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage, num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.pool.num_blocks,
            step_num_reqs=self._last_step[0], step_num_tokens=self._last_step[1])


def _reads_token_history(params: SamplingParams) -> bool:
    """Whether sampling this request's next token reads its previous ones on the host (a
    grammar's and bad_words' masks are made from them)."""
    return bool(params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0 or params.min_tokens
                or params.logprobs is not None or params.prompt_logprobs is not None
                or params.structured_outputs is not None or params.bad_words_token_ids)

