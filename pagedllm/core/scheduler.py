"""Scheduler: decides, each step, which requests get how many tokens (vLLM V1 style).

There are no prefill and decode phases: every request owes
``num_tokens + num_pending - num_computed_tokens`` tokens (``num_computed_tokens`` counts every
step scheduled so far, those still on the GPU included; ``num_pending`` is a sampled token still
on its way), and each step pays some of them within two limits, ``max_num_seqs`` requests and
``max_num_batched_tokens`` tokens. Running requests go first (decodes and unfinished prompt
chunks), then waiting ones in the policy's order (``request_queue``: arrival, or priority then
arrival). When the KV cache runs out, a running request the policy chooses (fcfs: the most
recently admitted; priority: the largest (priority, arrival_time)) is preempted by recompute: its
blocks are freed and it goes back to the waiting queue with nothing computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.request_queue import make_request_queue
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:  # engine.serial gives them to msgspec (they would import torch here)
    from pagedllm.multimodal.inputs import ImageFeature, MRopePositions

logger = logging.getLogger(__name__)


@dataclass
class NewRequestData:
    """What the runner keeps of a request, sent the step it is admitted (new, or resumed after a
    preemption). The runner appends the tokens it samples to ``output_token_ids`` (a copy)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_token_ids: list[int]
    images: tuple[ImageFeature, ...] = ()
    mrope: MRopePositions | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @classmethod
    def of(cls, req: Request) -> NewRequestData:
        return cls(req.request_id, req.prompt_token_ids, req.sampling_params,
                   list(req.output_token_ids), req.images, req.mrope)


class ScheduledRequest(msgspec.Struct, array_like=True, gc=False):
    """One request's share of a step, as values fixed at schedule time (a struct: half a
    dataclass's cost to build, and a third less to decode on a tensor-parallel worker)."""

    request_id: str
    # The step's tokens known on the host. One fewer than num_new_tokens: the last one is still
    # being sampled by the step in flight (async scheduling), and is taken on the device.
    token_ids: list[int]
    num_new_tokens: int  # tokens computed this step, from num_computed_tokens below
    block_ids: list[int]  # the KV cache manager's live list (see live_block_ids): read only
    num_computed_tokens: int  # the request's computed tokens before this step
    samples: bool  # this step reaches the request's last token, so a token is sampled


@dataclass
class SchedulerOutput:
    """One step's decision: which requests, how many tokens each, in which blocks; the
    requests the runner has not seen yet. Values only: no live ``Request`` crosses."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    num_new_prompts: int = 0
    num_prompt_chunks: int = 0
    num_decodes: int = 0
    preempted: list[str] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens > max_model_len:
        raise ValueError(f"The prompt (length {num_prompt_tokens}) is longer than the maximum "
                         f"model length of {max_model_len}.")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting = make_request_queue(config.scheduling_policy)
        self.running: list[Request] = []
        # By id: the unfinished, and finished ones with a token still in flight.
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        check_prompt_fits(request.num_prompt_tokens, self.config.max_model_len)
        self.waiting.add(request)
        self.requests[request.request_id] = request

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if logger.isEnabledFor(logging.DEBUG) and out.scheduled:
            logger.debug(
                "step: %d seqs, %d tokens (%d new prompts, %d prompt chunks, %d decodes), "
                "%d running, %d waiting%s", len(out.scheduled), out.total_num_tokens,
                out.num_new_prompts, out.num_prompt_chunks, out.num_decodes, len(self.running),
                len(self.waiting),
                f", preempted {out.preempted}" if out.preempted else "")
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            owed = req.num_tokens + req.num_pending - req.num_computed_tokens
            if owed == 0 or self._ends_in_flight(req):
                i += 1
                continue
            n = min(owed, budget)
            while not self.kv_cache.allocate(req, n):
                victim = self.waiting.victim(self.running)
                at = self.running.index(victim)
                del self.running[at]
                if at < i:  # passed earlier in this step (priority): undo its share
                    budget += self._unschedule(out, victim)
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                self._add(out, req, n, new=False)
                budget -= n
                i += 1
        return budget

    @staticmethod
    def _unschedule(out: SchedulerOutput, req: Request) -> int:
        """Takes back a running request's share of this step, if any; returns its tokens."""
        at = next((k for k, s in enumerate(out.scheduled) if s.request_id == req.request_id),
                  None)
        if at is None:  # it had nothing to compute this step
            return 0
        s = out.scheduled.pop(at)
        req.num_pending -= s.samples
        if s.num_computed_tokens < req.num_prompt_tokens:
            out.num_prompt_chunks -= 1
        else:
            out.num_decodes -= 1
        return s.num_new_tokens

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.peek_next()
            if not req.ready:
                skipped.append(self.waiting.pop_next())
                continue
            cached = self.kv_cache.find_cached_prefix(req)
            num_cached = len(cached) * self.kv_cache.block_size
            n = req.num_tokens - num_cached
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not self.kv_cache.allocate(req, n, cached):
                break
            self.waiting.pop_next()
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add(out, req, n, new=True)
            budget -= n
        self.waiting.put_back(skipped)

    def _ends_in_flight(self, req: Request) -> bool:
        """Whether the token in flight for ``req`` will end it by length (async scheduling):
        then there is nothing left to compute for it."""
        if not req.num_pending:
            return False
        max_tokens = req.sampling_params.max_tokens
        return req.num_tokens + req.num_pending >= self.config.max_model_len or (
            max_tokens is not None and req.num_output_tokens + req.num_pending >= max_tokens)

    def _add(self, out: SchedulerOutput, req: Request, n: int, new: bool) -> None:
        start = req.num_computed_tokens
        samples = start + n == req.num_tokens + req.num_pending
        out.scheduled.append(ScheduledRequest(
            req.request_id, req.token_ids(start, min(start + n, req.num_tokens)), n,
            self.kv_cache.live_block_ids(req.request_id), start, samples))
        if new:
            out.new_requests.append(NewRequestData.of(req))
            out.num_new_prompts += 1
        elif start < req.num_prompt_tokens:
            out.num_prompt_chunks += 1
        else:
            out.num_decodes += 1
        # Counted as computed from now on, so the next step can be scheduled before this one
        # has run (async scheduling); the sampled token itself is pending until it arrives.
        req.num_computed_tokens = start + n
        req.num_pending += samples

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(req)
        logger.debug("preempted %s (recompute)", req.request_id)

    def update_from_output(self, out: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """Appends the step's sampled tokens (one per scheduled request that samples, in order)
        and applies token-level stop rules. A request that ended meanwhile (aborted, or stopped
        by the step before with async scheduling) drops its token.

        Returns the requests that got a new token this step (finished ones included).
        """
        progressed = []
        rows = (s for s in out.scheduled if s.samples)
        for s, token in zip(rows, sampled):
            req = self.requests[s.request_id]
            req.num_pending -= 1
            if req.is_finished:
                if not req.num_pending:
                    del self.requests[req.request_id]
                continue
            req.output_token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish(req, status)
            progressed.append(req)
        return progressed

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        """A stop token ends the request as "stop" even when it is also the last token allowed
        (as vLLM reports it); min_tokens holds back stop tokens, never the length limit."""
        params, num_output = req.sampling_params, req.num_output_tokens
        if num_output >= params.min_tokens and (token in params.stop_token_ids or (
                not params.ignore_eos and token in params.all_stop_token_ids)):
            req.stop_reason = token if token in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        if req.num_tokens >= self.config.max_model_len or (
                params.max_tokens is not None and num_output >= params.max_tokens):
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Ends a request (stopped, length or aborted) and frees its blocks at once."""
        if req.is_finished:
            return
        req.status = status
        if not req.num_pending:  # else it goes once its token in flight is back
            self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv_cache.free(req)
