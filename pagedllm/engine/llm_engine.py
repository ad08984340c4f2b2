"""LLMEngine: requests in, RequestOutputs out, one ``step()`` at a time.

``step()`` = schedule -> launch the model -> apply a step's sampled tokens (token-level stop rules)
-> detokenize, apply stop strings -> outputs. With async scheduling (on a GPU) the tokens applied
are the previous step's, while this one runs. The offline ``LLM`` and the server's ``AsyncLLM``
both drive it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler, SchedulerOutput
from pagedllm.engine.inputs import InputProcessor, ProcessedPrompt, PromptType
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer
from pagedllm.worker.model_runner import LaunchedStep, ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of blocks held by requests
    num_preemptions: int  # cumulative
    prompt_tokens: int  # cumulative prompt tokens computed (prefix-cache hits excluded)
    generation_tokens: int  # cumulative sampled tokens
    prefix_cache_queries: int  # cumulative, in tokens
    prefix_cache_hits: int
    num_free_blocks: int
    num_total_blocks: int
    step_num_reqs: int  # of the last step
    step_num_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, runner: ModelRunner,
                 num_blocks: int, model_name: str, vocab_size: int,
                 input_processor: InputProcessor) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.input_processor = input_processor
        flag = config.scheduler.async_scheduling
        self.async_scheduling = runner.device.type == "cuda" if flag is None else flag
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        # Requests whose sampling reads their latest tokens on the host (penalties, min_tokens,
        # logprobs): while any is unfinished, each step completes before the next is scheduled.
        self._exact: set[str] = set()
        self.runner = runner
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.kv_cache = KVCacheManager(num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.output_processor = OutputProcessor(tokenizer)
        self._children: dict[str, list[Request]] = {}  # user request id -> its samples
        self._parent: dict[str, tuple[str, int]] = {}  # sample id -> (user request id, index)
        self._eos_ids = set(runner.arch.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self._eos_ids.add(tokenizer.eos_token_id)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_step = (0, 0)

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> LLMEngine:
        """Builds the engine from flat arguments (``pagedllm.config`` field names)."""
        from pagedllm.engine.builder import build_engine

        return build_engine(cls, kwargs)

    # -- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt,
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Validates and queues a request; raises ValueError with a clear message if bad.

        ``prompt``: text, token ids, a dict with ``multi_modal_data`` (see ``engine.inputs``),
        or a prompt the caller already ran through ``self.input_processor``."""
        if request_id in self._children or request_id in self._parent:
            raise ValueError(f"request id {request_id!r} is already in use")
        processed = self.input_processor.process(prompt)
        self._validate(processed.token_ids, params)
        params = copy.copy(params)
        params.all_stop_token_ids = set(self._eos_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = self._make_samples(request_id, processed, params, arrival)
        for child in children:
            self.scheduler.add_request(child)
        self._children[request_id] = children
        self.output_processor.add(request_id, processed.text, children, params, arrival)
        if _reads_token_history(params):
            self._exact.add(request_id)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("The prompt cannot be empty.")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (size {self.vocab_size}).")
        params.check_limits(self.vocab_size, self.config.model.max_logprobs)

    def _make_samples(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                      arrival: float) -> list[Request]:
        def request(req_id: str, req_params: SamplingParams,
                    wait_for: Request | None = None) -> Request:
            return Request(req_id, prompt.token_ids, req_params, arrival, wait_for=wait_for,
                           images=prompt.images, mrope=prompt.mrope)

        if params.n == 1:
            self._parent[request_id] = (request_id, 0)
            return [request(request_id, params)]
        children: list[Request] = []
        for i in range(params.n):
            child_params = copy.copy(params)
            child_params.n = 1
            if params.seed is not None:
                child_params.seed = params.seed + i
            child_id = f"{request_id}-{i}"
            if child_id in self._parent or child_id in self._children:
                raise ValueError(f"request id {request_id!r} with n={params.n} would reuse the "
                                 f"id {child_id!r} of a request in progress")
            first = children[0] if children else None
            children.append(request(child_id, child_params, first))
            self._parent[child_id] = (request_id, i)
        return children

    def abort_request(self, request_ids: Iterable[str]) -> None:
        """Ends the requests now and frees their KV blocks; no more output is produced."""
        for request_id in request_ids:
            for child in self._children.pop(request_id, []):
                self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                self._forget(child)
            self._exact.discard(request_id)
            self.output_processor.abort(request_id)

    def _forget(self, req: Request) -> None:
        self._parent.pop(req.request_id, None)
        self.runner.free_request(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._children) or self._in_flight is not None

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step. With async scheduling, the step is launched on the GPU and the outputs
        returned are the previous step's, made while this one runs."""
        if self._in_flight is not None and self._exact:
            return self._finish_in_flight()  # the next step's sampling needs these tokens
        sched = self.scheduler.schedule()
        self._last_step = (len(sched.scheduled), sched.total_num_tokens)
        if sched.is_empty:
            return self._finish_in_flight()
        now = time.monotonic()
        for s in sched.scheduled:
            req = s.request
            prompt_left = req.num_prompt_tokens - s.num_computed_tokens
            if prompt_left > 0:  # a prompt chunk (a request's first step is always one)
                self.output_processor.on_scheduled(self._parent[req.request_id][0], req, now)
                self._prompt_tokens += min(prompt_left, s.num_new_tokens)
        launched = self.runner.launch(sched)
        outputs = self._finish_in_flight()
        self._in_flight = (sched, launched)
        if not self.async_scheduling or self._exact:
            outputs += self._finish_in_flight()
        return outputs

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Waits for the step in flight (if any) and applies its tokens."""
        if self._in_flight is None:
            return []
        sched, launched = self._in_flight
        self._in_flight = None
        result = launched.result()
        progressed = self.scheduler.update_from_output(sched, result.sampled)
        now = time.monotonic()
        for req_id, entries in result.prompt_logprobs.items():
            self.output_processor.add_prompt_logprobs(self._parent[req_id][0], entries)
        self._generation_tokens += len(progressed)
        deferred = self.output_processor.deferred
        for req in progressed:
            # A deferred sample's text is made from all its tokens when it finishes; its first
            # token still goes through, for the time to first token. (A request that got a
            # token is running or has just finished.)
            if (req.request_id in deferred and req.status is RequestStatus.RUNNING
                    and req.num_output_tokens > 1):
                continue
            self._process_token(req, result.logprobs.get(req.request_id), now)
        return self._collect_outputs(now)

    def _process_token(self, req: Request, logprobs: Any, now: float) -> None:
        parent_id, index = self._parent[req.request_id]
        stop = self.output_processor.on_token(parent_id, index, logprobs, now)
        if stop is not None:  # a stop string wins over the length limit reached at once
            req.stop_reason = stop
            if req.is_finished:
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            self.output_processor.finish_sample(parent_id, index, req.status.finish_reason,
                                                req.stop_reason)

    def _collect_outputs(self, now: float) -> list[RequestOutput]:
        outputs = self.output_processor.make_outputs(now)
        for out in outputs:
            if out.finished:
                for child in self._children.pop(out.request_id, []):
                    self._forget(child)
                self._exact.discard(out.request_id)
        return outputs

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
    """Whether sampling this request's next token reads its previous ones on the host."""
    return bool(params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0 or params.min_tokens
                or params.logprobs is not None or params.prompt_logprobs is not None)
