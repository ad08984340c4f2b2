"""Scheduler, driven without a model: ``schedule()``, then fake sampled tokens for the requests
whose step reaches their last token."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import PLACEHOLDER_BLOCK_ID, KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler, SchedulerOutput
from pagedllm.sampling_params import SamplingParams

EOS = 2


def make_scheduler(*, num_blocks: int = 64, block_size: int = 16, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 64,
                   chunked: bool = True, caching: bool = True, window: int = 0,
                   policy: str = "fcfs") -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             enable_chunked_prefill=chunked, max_model_len=max_model_len,
                             scheduling_policy=policy)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, caching, window))


def make_request(request_id: str, num_prompt: int, *, first: int | None = None,
                 wait_for: Request | None = None, priority: int = 0,
                 arrival_time: float | None = None, **params: object) -> Request:
    """A request whose prompt tokens are distinct from other requests' (no accidental hits)."""
    start = 1000 * (sum(map(ord, request_id)) + 1) if first is None else first
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    sampling.all_stop_token_ids = {EOS}
    req = Request(request_id, list(range(start, start + num_prompt)), sampling,
                  priority=priority, wait_for=wait_for)
    if arrival_time is not None:
        req.arrival_time = arrival_time
    return req


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """One engine step with a fake model that samples ``token`` for every request that samples."""
    out = sched.schedule()
    sched.update_from_output(out, [token for s in out.scheduled if s.samples])
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request_id, s.num_new_tokens) for s in out.scheduled]


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.num_unfinished:
        outs.append(step(sched))
        assert len(outs) < max_steps, "the scheduler made no progress"
    return outs


def assert_pool_whole(sched: Scheduler) -> None:
    kv = sched.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def add_all(sched: Scheduler, requests: Iterable[Request]) -> None:
    for req in requests:
        sched.add_request(req)


# -- budgets -------------------------------------------------------------------------------


def test_token_budget_and_max_num_seqs_every_step() -> None:
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=32)
    reqs = [make_request(f"r{i}", 20, max_tokens=3) for i in range(10)]
    add_all(sched, reqs)
    assert plan(step(sched)) == [("r0", 20), ("r1", 12)]
    # Running first (r0's decode, r1's last chunk), then new prompts up to the budget.
    assert plan(step(sched)) == [("r0", 1), ("r1", 8), ("r2", 20), ("r3", 3)]
    # Four running: nobody else is admitted although the budget has room.
    assert plan(step(sched)) == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 17)]
    assert reqs[0].status is RequestStatus.FINISHED_LENGTH
    assert reqs[0].output_token_ids == [7, 7, 7]
    for out in run_to_completion(sched):
        assert out.total_num_tokens <= 32
        assert len(out.scheduled) <= 4
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert_pool_whole(sched)


def test_running_requests_go_first() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_request("a", 10, max_tokens=5)
    sched.add_request(a)
    step(sched)
    b = make_request("b", 30)
    sched.add_request(b)
    out = step(sched)
    assert plan(out) == [("a", 1), ("b", 15)]
    assert (out.num_new_prompts, out.num_prompt_chunks, out.num_decodes) == (1, 0, 1)


def test_chunked_prefill_finishes_a_long_prompt_over_several_steps() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, max_model_len=64)
    req = make_request("a", 40, max_tokens=2)
    sched.add_request(req)
    expected = [(16, False, 0), (16, False, 16), (8, True, 32)]
    for i, (n, samples, computed_before) in enumerate(expected):
        out = sched.schedule()
        (s,) = out.scheduled
        assert (s.num_new_tokens, s.samples, s.num_computed_tokens) == (n, samples,
                                                                         computed_before)
        assert (out.num_new_prompts, out.num_prompt_chunks) == ((1, 0) if i == 0 else (0, 1))
        assert len(s.block_ids) == -(-(computed_before + n) // 16)
        sched.update_from_output(out, [5] if s.samples else [])
        assert req.output_token_ids == ([5] if samples else [])
    assert req.num_computed_tokens == 40
    out = step(sched)  # then one decode
    assert plan(out) == [("a", 1)] and out.num_decodes == 1
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert_pool_whole(sched)


def test_chunked_prefill_chunks_only_the_last_admitted_prompt() -> None:
    sched = make_scheduler(max_num_batched_tokens=32)
    add_all(sched, [make_request("a", 10), make_request("b", 12), make_request("c", 30)])
    assert plan(sched.schedule()) == [("a", 10), ("b", 12), ("c", 10)]


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits() -> None:
    sched = make_scheduler(max_num_batched_tokens=32, max_model_len=32, chunked=False)
    add_all(sched, [make_request("a", 20, max_tokens=4), make_request("b", 20),
                    make_request("c", 5)])
    out = step(sched)
    assert plan(out) == [("a", 20)]  # b (20 > 12 left) waits, and c waits behind it
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert plan(step(sched)) == [("a", 1), ("b", 20), ("c", 5)]


def test_decodes_one_token_per_step_after_the_prompt() -> None:
    sched = make_scheduler()
    req = make_request("a", 10, max_tokens=4)
    sched.add_request(req)
    outs = run_to_completion(sched)
    assert [plan(o) for o in outs] == [[("a", 10)], [("a", 1)], [("a", 1)], [("a", 1)]]
    assert [o.num_decodes for o in outs] == [0, 1, 1, 1]
    assert req.num_computed_tokens == 13 and req.num_tokens == 14


def test_update_from_output_returns_requests_with_a_new_token() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b = make_request("a", 4), make_request("b", 30)
    add_all(sched, [a, b])
    out = sched.schedule()
    assert [s.samples for s in out.scheduled] == [True, False]
    assert sched.update_from_output(out, [9]) == [a]
    assert b.num_computed_tokens == 12 and b.output_token_ids == []


# -- preemption ----------------------------------------------------------------------------


def test_preemption_by_recompute_takes_the_latest_admitted() -> None:
    # 7 blocks of 4 tokens; three prompts of 8 tokens take 6.
    sched = make_scheduler(num_blocks=7, block_size=4, max_num_seqs=3, caching=False)
    a, b, c, d = (make_request(x, 8, max_tokens=6) for x in "abcd")
    add_all(sched, [a, b, c, d])
    assert plan(step(sched)) == [("a", 8), ("b", 8), ("c", 8)]
    assert sched.kv_cache.num_free_blocks == 1
    # Each now has 9 tokens: a takes the last block, b needs one too, so c is preempted.
    out = step(sched)
    assert out.preempted == ["c"]
    assert plan(out) == [("a", 1), ("b", 1)]  # no new admissions in a step that preempts
    assert c.status is RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0
    assert c.output_token_ids == [7]  # its sampled token is kept; its KV is recomputed
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["c", "d"]  # the front of the queue
    assert [r.request_id for r in sched.running] == ["a", "b"]
    assert sched.kv_cache.block_ids("c") == []
    assert sched.kv_cache.num_free_blocks == 1
    run_to_completion(sched)
    for req in (a, b, c, d):
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert req.output_token_ids == [7] * 6
    assert_pool_whole(sched)


def test_the_latest_admitted_preempts_itself_when_it_cannot_grow() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4, caching=False)
    a, b = make_request("a", 8, max_tokens=4), make_request("b", 8, max_tokens=4)
    add_all(sched, [a, b])
    step(sched)  # 4 of 5 blocks taken
    out = step(sched)  # a takes the last block; b, the latest admitted, is its own victim
    assert out.preempted == ["b"]
    assert plan(out) == [("a", 1)]
    assert b.status is RequestStatus.PREEMPTED and list(sched.waiting) == [b]
    run_to_completion(sched)
    assert a.output_token_ids == b.output_token_ids == [7] * 4
    assert_pool_whole(sched)


def test_preemption_frees_room_for_an_earlier_request() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, caching=False)
    a, b = make_request("a", 8, max_tokens=4), make_request("b", 8, max_tokens=4)
    add_all(sched, [a, b])
    step(sched)  # all 4 blocks taken
    out = step(sched)  # a cannot grow: b is preempted, and its blocks let a go on
    assert out.preempted == ["b"]
    assert plan(out) == [("a", 1)]
    assert sched.kv_cache.block_ids("a") == [0, 1, 3]  # b's tail block came back first
    run_to_completion(sched)
    assert a.is_finished and b.is_finished
    assert_pool_whole(sched)


def test_preempted_request_resumes_from_its_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=7, block_size=4, max_num_seqs=3, caching=True)
    a, b, c = (make_request(x, 8, max_tokens=3) for x in "abc")
    add_all(sched, [a, b, c])
    step(sched)
    assert sched.kv_cache.block_ids("c") == [4, 5]
    out = step(sched)
    assert out.preempted == ["c"]
    # c's blocks went back tail first, so b took c's block 5; block 4 stays cached.
    assert sched.kv_cache.block_ids("b") == [2, 3, 5]
    resumed = None
    while resumed is None:
        out = sched.schedule()
        resumed = next((s for s in out.scheduled if s.request_id == "c"), None)
        if resumed is not None:
            # 9 tokens (8 prompt + 1 sampled): 4 come from the cache, 5 are recomputed.
            assert (c.num_tokens, resumed.num_computed_tokens, resumed.num_new_tokens) == (9, 4, 5)
            assert resumed.block_ids[0] == 4
        sched.update_from_output(out, [7 for s in out.scheduled if s.samples])
    run_to_completion(sched)
    assert c.output_token_ids == [7, 7, 7]
    assert c.num_cached_tokens == 0  # the hit at its first scheduling
    assert_pool_whole(sched)


# -- stop rules ----------------------------------------------------------------------------


def generate(req: Request, tokens: list[int], **kwargs: object) -> Request:
    """Runs one request, sampling ``tokens`` in turn, until it finishes or they run out."""
    sched = make_scheduler(**kwargs)  # type: ignore[arg-type]
    sched.add_request(req)
    feed = iter(tokens)
    while not req.is_finished:
        out = sched.schedule()
        token = next(feed, None)
        if token is None:
            break
        sched.update_from_output(out, [token])
    if req.is_finished:
        assert_pool_whole(sched)
    return req


def test_max_tokens_finishes_with_length() -> None:
    req = generate(make_request("a", 5, max_tokens=3), [10, 11, 12, 13])
    assert req.output_token_ids == [10, 11, 12]
    assert req.status.finish_reason == "length"


def test_eos_finishes_with_stop() -> None:
    req = generate(make_request("a", 5, max_tokens=10), [10, EOS, 12])
    assert req.output_token_ids == [10, EOS]
    assert req.status.finish_reason == "stop"
    assert req.stop_reason is None


def test_ignore_eos_keeps_going() -> None:
    req = generate(make_request("a", 5, max_tokens=3, ignore_eos=True), [EOS, EOS, EOS, 1])
    assert req.output_token_ids == [EOS, EOS, EOS]
    assert req.status.finish_reason == "length"


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    req = generate(make_request("a", 5, max_tokens=10, stop_token_ids=[42], ignore_eos=True),
                   [10, 42, 11])
    assert req.output_token_ids == [10, 42]
    assert req.status.finish_reason == "stop"
    assert req.stop_reason == 42


def test_min_tokens_suppresses_stops() -> None:
    req = generate(make_request("a", 5, max_tokens=10, min_tokens=3, stop_token_ids=[42]),
                   [EOS, 42, 10, 42, 11])
    assert req.output_token_ids == [EOS, 42, 10, 42]
    assert req.status.finish_reason == "stop" and req.stop_reason == 42


def test_a_stop_token_may_be_the_min_tokens_th_token() -> None:
    req = generate(make_request("a", 5, max_tokens=10, min_tokens=3), [EOS, 10, EOS, 11])
    assert req.output_token_ids == [EOS, 10, EOS]
    assert req.status.finish_reason == "stop"


def test_eos_on_the_last_allowed_token_is_a_stop() -> None:
    """As vLLM reports it: the model chose to stop, whatever the length limit."""
    req = generate(make_request("a", 5, max_tokens=2), [10, EOS])
    assert req.status.finish_reason == "stop"
    req = generate(make_request("b", 5, max_tokens=2, stop_token_ids=[11]), [10, 11])
    assert (req.status.finish_reason, req.stop_reason) == ("stop", 11)


def test_reaching_max_model_len_finishes_with_length() -> None:
    req = generate(make_request("a", 16, max_tokens=None), [10] * 10, max_model_len=20)
    assert req.output_token_ids == [10] * 4
    assert req.num_tokens == 20
    assert req.status.finish_reason == "length"


def test_prompt_longer_than_max_model_len_is_refused() -> None:
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match=r"length 33\).*maximum model length of 32"):
        sched.add_request(make_request("a", 33))
    sched.add_request(make_request("b", 32))  # exactly max_model_len is allowed
    assert sched.num_unfinished == 1


# -- abort ---------------------------------------------------------------------------------


def test_finish_aborts_running_and_waiting_requests_and_frees_blocks() -> None:
    sched = make_scheduler(max_num_seqs=1, block_size=4, num_blocks=16)
    a, b = make_request("a", 10), make_request("b", 10)
    add_all(sched, [a, b])
    step(sched)
    assert sched.kv_cache.block_ids("a") == [0, 1, 2]
    assert [r.request_id for r in sched.waiting] == ["b"]
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not sched.waiting and b.status.finish_reason == "abort"
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert not sched.running and a.status.finish_reason == "abort"
    assert sched.kv_cache.block_ids("a") == []
    assert_pool_whole(sched)
    sched.finish(a, RequestStatus.FINISHED_STOPPED)  # finishing twice changes nothing
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert sched.schedule().is_empty


def test_finish_all_aborts_mid_prompt() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    reqs = [make_request(x, 30) for x in "abc"]
    add_all(sched, reqs)
    step(sched)
    for req in reqs:
        sched.finish(req, RequestStatus.FINISHED_ABORTED)
    assert sched.num_unfinished == 0
    assert_pool_whole(sched)


# -- n > 1 samples -------------------------------------------------------------------------


def test_samples_wait_for_the_first_prompt_then_hit_its_blocks() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, block_size=16)
    first = make_request("s0", 40, first=0, max_tokens=3)
    others = [make_request(f"s{i}", 40, first=0, wait_for=first, max_tokens=3)
              for i in (1, 2)]
    add_all(sched, [first, *others])
    assert plan(step(sched)) == [("s0", 16)]  # samples are not admitted with the prompt's chunks
    assert plan(step(sched)) == [("s0", 16)]
    # With the prompt's last chunk scheduled, the two full blocks are cached (their K/V is
    # written before any layer reads): each sample computes the last 8 prompt tokens only,
    # in the same step, within the token budget.
    out = step(sched)
    assert plan(out) == [("s0", 8), ("s1", 8)]
    assert plan(step(sched)) == [("s0", 1), ("s1", 1), ("s2", 8)]
    blocks = {s.request_id: s.block_ids for s in out.scheduled}
    blocks["s2"] = sched.kv_cache.block_ids("s2")
    assert blocks["s1"][:2] == blocks["s0"][:2] == blocks["s2"][:2]
    assert len({blocks[x][2] for x in ("s0", "s1", "s2")}) == 3  # partial blocks: private
    assert [r.num_cached_tokens for r in others] == [32, 32]
    run_to_completion(sched)
    assert_pool_whole(sched)


def test_a_request_that_is_not_ready_does_not_block_others() -> None:
    # With chunked prefill a sample becomes ready as soon as its first sibling's last prompt
    # chunk is scheduled; a preempted request whose last token is still in flight (async
    # scheduling) waits for it, and the requests behind it go first.
    sched = make_scheduler(max_num_batched_tokens=16)
    first = make_request("s0", 30, first=0)
    sample = make_request("s1", 30, first=0, wait_for=first)
    add_all(sched, [first, sample])
    step(sched)
    assert plan(step(sched)) == [("s0", 14), ("s1", 2)]
    preempted, other = make_request("p", 4), make_request("x", 4)
    preempted.num_pending = 1
    sched.waiting.appendleft(preempted)
    sched.add_request(other)
    assert "x" in dict(plan(sched.schedule()))
    assert sched.waiting[0] is preempted  # still first in line


def test_fcfs_preempts_the_latest_admitted_whatever_its_priority() -> None:
    # The same scene as the priority test below: fcfs ignores priorities entirely.
    sched = make_scheduler(num_blocks=7, block_size=4, max_num_seqs=3, caching=False)
    b = make_request("b", 7, max_tokens=6)
    sched.add_request(b)
    step(sched)
    a, c = make_request("a", 7, max_tokens=6), make_request("c", 7, max_tokens=6)
    add_all(sched, [a, c])
    step(sched), step(sched)
    out = step(sched)
    assert out.preempted == ["c"] and plan(out) == [("b", 1), ("a", 1)]


# -- priority scheduling (--scheduling-policy priority) ------------------------------------


def admitted(outs: Iterable[SchedulerOutput]) -> list[str]:
    return [r.request_id for o in outs for r in o.new_requests]


def test_priority_admits_the_lowest_value_first_then_by_arrival() -> None:
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    add_all(sched, [make_request("late-low", 4, priority=5, arrival_time=1.0, max_tokens=1),
                    make_request("high", 4, priority=-1, arrival_time=3.0, max_tokens=1),
                    make_request("early-low", 4, priority=5, arrival_time=0.5, max_tokens=1),
                    make_request("mid", 4, priority=0, arrival_time=2.0, max_tokens=1)])
    assert admitted(run_to_completion(sched)) == ["high", "mid", "early-low", "late-low"]
    assert_pool_whole(sched)


def test_priority_ties_go_by_arrival_time_then_by_queue_order() -> None:
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    add_all(sched, [make_request("second", 4, arrival_time=2.0, max_tokens=1),
                    make_request("first", 4, arrival_time=1.0, max_tokens=1),
                    make_request("third-a", 4, arrival_time=3.0, max_tokens=1),
                    make_request("third-b", 4, arrival_time=3.0, max_tokens=1)])
    assert admitted(run_to_completion(sched)) == ["first", "second", "third-a", "third-b"]


def test_fcfs_ignores_priority() -> None:
    sched = make_scheduler(max_num_seqs=1)
    add_all(sched, [make_request("a", 4, priority=9, max_tokens=1),
                    make_request("b", 4, priority=-9, max_tokens=1)])
    assert admitted(run_to_completion(sched)) == ["a", "b"]


def test_priority_preempts_the_largest_priority_value_not_the_latest_admitted() -> None:
    # 7 blocks of 4 tokens. b (priority 5) runs alone first; a (1) and c (0) join a step later,
    # so the running order is b, c, a. At the 9th token each needs a third block: b takes the
    # last one, then c cannot grow and the victim is b, although b was served earlier in the
    # same step: its share of the step is taken back and c and a go on.
    sched = make_scheduler(num_blocks=7, block_size=4, max_num_seqs=3, caching=False,
                           policy="priority")
    b = make_request("b", 7, priority=5, arrival_time=0.0, max_tokens=6)
    sched.add_request(b)
    step(sched)
    a = make_request("a", 7, priority=1, arrival_time=1.0, max_tokens=6)
    c = make_request("c", 7, priority=0, arrival_time=2.0, max_tokens=6)
    x = make_request("x", 7, priority=3, arrival_time=3.0, max_tokens=6)
    y = make_request("y", 7, priority=9, arrival_time=0.5, max_tokens=6)
    add_all(sched, [a, c])
    assert admitted([step(sched)]) == ["c", "a"]
    assert [r.request_id for r in sched.running] == ["b", "c", "a"]
    step(sched)  # b takes its third block
    add_all(sched, [x, y])  # no room in max_num_seqs: they wait
    out = step(sched)
    assert out.preempted == ["b"]
    assert plan(out) == [("c", 1), ("a", 1)] and out.num_decodes == 2
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_pending == 0 and b.output_token_ids == [7, 7, 7]
    assert [r.request_id for r in sched.running] == ["c", "a"]
    # Back in the waiting queue by its key (priority 5): after x (3), before y (9).
    assert [r.request_id for r in sched.waiting] == ["x", "b", "y"]
    run_to_completion(sched)
    for req in (a, b, c, x, y):
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert req.output_token_ids == [7] * 6
    assert_pool_whole(sched)


def test_priority_victim_ties_go_to_the_latest_admitted() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4, caching=False, policy="priority")
    a = make_request("a", 8, arrival_time=1.0, max_tokens=4)
    b = make_request("b", 8, arrival_time=1.0, max_tokens=4)
    add_all(sched, [a, b])
    step(sched)
    out = step(sched)  # same key: b, admitted last, is its own victim as under fcfs
    assert out.preempted == ["b"] and plan(out) == [("a", 1)]


def test_priority_a_request_that_is_not_ready_keeps_its_place() -> None:
    sched = make_scheduler(policy="priority")
    preempted = make_request("p", 4, priority=-5)
    preempted.num_pending = 1  # its last token is still in flight (async scheduling)
    sched.add_request(preempted)
    sched.add_request(make_request("x", 4, priority=5))
    assert "x" in dict(plan(sched.schedule()))
    assert sched.waiting.peek_next() is preempted  # still first in line


def test_priority_samples_of_one_request_wait_for_the_first() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, policy="priority")
    first = make_request("s0", 30, first=0, priority=2, max_tokens=2)
    sample = make_request("s1", 30, first=0, wait_for=first, priority=2, max_tokens=2)
    add_all(sched, [sample, first])  # the sample is queued first: it still waits
    assert plan(step(sched)) == [("s0", 16)]
    run_to_completion(sched)
    assert first.output_token_ids == sample.output_token_ids == [7, 7]
    assert_pool_whole(sched)


@pytest.mark.parametrize("seed", range(6))
def test_priority_async_scheduling_gives_the_same_tokens(seed: int) -> None:
    """Random priorities, tight KV cache, aborts: with or without async scheduling each
    request gets the same tokens and every block comes back."""
    rng = random.Random(100 + seed)
    # (name, prompt length, max_tokens, priority, step it arrives at)
    specs = [(f"r{i}", rng.randint(1, 60), rng.choice([None, 1, 3, 20]), rng.randint(-2, 2),
              rng.randint(0, 40)) for i in range(rng.randint(4, 12))]
    aborts = {rng.randint(1, 30): f"r{rng.randrange(len(specs))}"}
    results = []
    for lag in (False, True):
        sched = make_scheduler(num_blocks=20, block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=16, max_model_len=80, policy="priority")
        later: dict[int, list[Request]] = {}
        for i, (name, n, m, prio, at) in enumerate(specs):
            later.setdefault(at, []).append(make_request(
                name, n, max_tokens=m, first=7 * i, priority=prio, arrival_time=float(at)))
        requests = [r for g in later.values() for r in g]
        _run([], sched, lag, aborts, later)
        assert_pool_whole(sched)
        assert all(r.num_pending == 0 for r in requests)
        results.append([(r.output_token_ids, r.status) for r in requests])
    for (tokens, status), (tokens_async, status_async) in zip(*results):
        if RequestStatus.FINISHED_ABORTED in (status, status_async):
            continue
        assert (tokens_async, status_async) == (tokens, status)


def test_sample_of_an_aborted_request_runs_alone() -> None:
    sched = make_scheduler()
    first = make_request("s0", 10, first=0)
    sample = make_request("s1", 10, first=0, wait_for=first, max_tokens=2)
    add_all(sched, [first, sample])
    sched.finish(first, RequestStatus.FINISHED_ABORTED)
    assert plan(step(sched)) == [("s1", 10)]


# -- logging -------------------------------------------------------------------------------


def test_debug_line_per_step(caplog: pytest.LogCaptureFixture) -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    add_all(sched, [make_request("a", 4, max_tokens=5), make_request("b", 30)])
    with caplog.at_level(logging.DEBUG, logger="pagedllm.core.scheduler"):
        step(sched)
        step(sched)
    lines = [r.getMessage() for r in caplog.records if r.name == "pagedllm.core.scheduler"]
    assert lines == [
        "step: 2 seqs, 16 tokens (2 new prompts, 0 prompt chunks, 0 decodes), "
        "2 running, 0 waiting",
        "step: 2 seqs, 16 tokens (0 new prompts, 1 prompt chunks, 1 decodes), "
        "2 running, 0 waiting",
    ]


# -- randomized stress ---------------------------------------------------------------------


def held_block_ids(kv: KVCacheManager, req: Request) -> list[int]:
    """The blocks the request references: its table after the slots out of the window, which
    are placeholders."""
    ids, held = kv.block_ids(req.request_id), kv.held_block_ids(req.request_id)
    num_dropped = len(ids) - len(held)
    assert ids[:num_dropped] == [PLACEHOLDER_BLOCK_ID] * num_dropped
    assert ids[num_dropped:] == held
    return held


def out_of_window(kv: KVCacheManager, num_computed: int) -> int:
    """Leading blocks no query at num_computed or later sees: those ending at or before
    num_computed - window, as a query at p sees (p - window, p]."""
    if not kv.sliding_window:
        return 0
    return max(num_computed - kv.sliding_window + 1, 0) // kv.block_size


def check_invariants(sched: Scheduler, out: SchedulerOutput,
                     live: list[Request]) -> None:
    cfg, kv = sched.config, sched.kv_cache
    assert out.total_num_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert len(sched.running) <= cfg.max_num_seqs
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        req = sched.requests[s.request_id]
        assert s.token_ids == req.token_ids(s.num_computed_tokens, min(
            s.num_computed_tokens + s.num_new_tokens, req.num_tokens))
        assert s.num_new_tokens >= 1
        assert s.num_computed_tokens + s.num_new_tokens == req.num_computed_tokens
        assert req.num_computed_tokens <= req.num_tokens + req.num_pending
        assert len(s.block_ids) == -(-req.num_computed_tokens // kv.block_size)
        # Dropped when the step is scheduled: every block out of its first query's window.
        num_held = len(kv.held_block_ids(s.request_id))
        assert len(s.block_ids) - num_held == out_of_window(kv, s.num_computed_tokens)
    # Every held block is referenced exactly once per holder, and nothing else is held.
    holders: dict[int, int] = {}
    for req in live:
        for block_id in held_block_ids(kv, req):
            holders[block_id] = holders.get(block_id, 0) + 1
    for block in kv.pool.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0)
    assert kv.num_free_blocks == kv.pool.num_blocks - len(holders)
    if not kv.enable_caching:
        assert sum(len(held_block_ids(kv, r)) for r in live) == len(holders)


def write_and_read_kv(kv_store: dict[int, list[tuple[int, ...] | None]], out: SchedulerOutput,
                      block_size: int, requests: dict[str, Request], window: int = 0) -> None:
    """A fake model: a token's K/V depends on it and every token before it, so each slot gets
    the token's whole prefix. Writes every scheduled token's slot, then checks that every
    scheduled request reads its own prefixes in all the slots its queries see (prefix-cache hits
    included): all of them, or with a window, those from its first query's window on."""
    for s in out.scheduled:
        req = requests[s.request_id]
        start = s.num_computed_tokens
        for pos in range(start, start + s.num_new_tokens):
            slots = kv_store.setdefault(s.block_ids[pos // block_size], [None] * block_size)
            slots[pos % block_size] = tuple(req.token_ids(0, pos + 1))
    for s in out.scheduled:
        req = requests[s.request_id]
        end = s.num_computed_tokens + s.num_new_tokens
        first = max(s.num_computed_tokens - window + 1, 0) if window else 0
        for pos in range(first, end):
            seen = kv_store[s.block_ids[pos // block_size]][pos % block_size]
            assert seen == tuple(req.token_ids(0, pos + 1)), \
                f"{req.request_id} reads wrong KV at position {pos}"


@pytest.mark.parametrize(("chunked", "caching", "seed", "window"),
                         [(True, True, 0, 0), (True, False, 1, 0), (False, True, 2, 0),
                          (False, False, 3, 0), (True, True, 4, 0),
                          # every layer slides: blocks left of the window go back to the pool
                          (True, True, 5, 6), (True, False, 6, 5), (False, True, 10, 9),
                          (True, True, 8, 2), (True, True, 9, 12)])
def test_randomized_stress(chunked: bool, caching: bool, seed: int, window: int) -> None:
    rng = random.Random(seed)
    block_size, max_model_len = 4, 48
    # 12 blocks hold one 48-token prompt computed at once, as a window needs too.
    sched = make_scheduler(num_blocks=12 if window else 20, block_size=block_size,
                           max_num_seqs=6, max_num_batched_tokens=48,
                           max_model_len=max_model_len, chunked=chunked, caching=caching,
                           window=window)
    prefixes = [[rng.randrange(3, 50) for _ in range(12)] for _ in range(3)]
    pieces = [[rng.randrange(3, 50) for _ in range(block_size)] for _ in range(2)]
    live: list[Request] = []
    kv_store: dict[int, list[tuple[int, ...] | None]] = {}
    num_added, num_steps = 0, 0
    while num_added < 120 or sched.num_unfinished:
        if num_added < 120 and rng.random() < 0.5:
            prompt_len = rng.randint(1, max_model_len)
            kind = rng.random()
            if kind < 0.4:  # a shared prefix, then anything
                prompt = [*rng.choice(prefixes), *[rng.randrange(3, 50) for _ in range(40)]]
            elif kind < 0.7:  # equal blocks after different prefixes: chained hashes tell apart
                prompt = [t for _ in range(12) for t in rng.choice(pieces)]
            else:
                prompt = [rng.randrange(3, 50) for _ in range(48)]
            params = SamplingParams(max_tokens=rng.choice([None, 1, 3, 10, 30]),
                                    min_tokens=rng.choice([0, 0, 1]))
            params.all_stop_token_ids = {EOS}
            first = Request(f"r{num_added}", prompt[:prompt_len], params)
            group = [first] + [Request(f"r{num_added}-{i}", first.prompt_token_ids, params,
                                       wait_for=first)
                               for i in range(1, rng.choice([1, 1, 1, 2, 3]))]
            add_all(sched, group)
            live.extend(group)
            num_added += 1
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            sched.finish(victim, RequestStatus.FINISHED_ABORTED)
        out = sched.schedule()
        check_invariants(sched, out, live)
        write_and_read_kv(kv_store, out, block_size, sched.requests, window)
        sampled = [rng.choice([EOS, 5, 6, 7, 8, 9, 10, 11]) for s in out.scheduled if s.samples]
        sched.update_from_output(out, sampled)
        for req in live:
            assert req.num_computed_tokens <= req.num_tokens
            # A prompt of max_model_len tokens may sample one token that is never computed.
            assert req.num_computed_tokens <= max_model_len
            assert req.num_tokens <= max(max_model_len, req.num_prompt_tokens + 1)
            if req.status is RequestStatus.RUNNING:
                # Blocks cover exactly the computed tokens between steps.
                assert len(sched.kv_cache.block_ids(req.request_id)) == \
                    -(-req.num_computed_tokens // block_size)
            else:
                assert sched.kv_cache.block_ids(req.request_id) == []
        live = [r for r in live if not r.is_finished]
        num_steps += 1
        assert num_steps < 5000, "the scheduler made no progress"
    assert_pool_whole(sched)
    assert sched.kv_cache.usage == 0.0
    assert sched.num_preemptions > 0  # the pool is small enough to force some
    if caching:
        assert sched.kv_cache.prefix_cache_hits > 0


# -- async scheduling: step N+1 is scheduled before step N's tokens are known -----------------


def _model_token(req: Request) -> int:
    """A deterministic 'model': the next token depends only on the tokens so far."""
    tokens = req.token_ids(0, req.num_tokens)
    return EOS if (sum(tokens) * 31 + len(tokens)) % 23 == 0 else 5 + len(tokens) % 7


def _run(requests: list[Request], sched: Scheduler, lag: bool, aborts: dict[int, str],
         later: dict[int, list[Request]] | None = None) -> int:
    """Runs to completion; with ``lag`` each step's tokens are applied after the next step is
    scheduled, as the engine does with async scheduling. ``later``: requests added before step
    k. Returns the number of steps."""
    add_all(sched, requests)
    later = dict(later or {})
    by_id = {r.request_id: r for r in [*requests, *(r for g in later.values() for r in g)]}
    in_flight: SchedulerOutput | None = None
    steps = 0
    while sched.num_unfinished or in_flight is not None or later:
        add_all(sched, later.pop(steps, []))
        if steps in aborts and aborts[steps] in sched.requests:  # arrived and not finished
            sched.finish(by_id[aborts[steps]], RequestStatus.FINISHED_ABORTED)
        out = sched.schedule()
        if lag:
            done, in_flight = in_flight, (None if out.is_empty else out)
        else:
            done = out
        if done is not None:
            sched.update_from_output(done, [_model_token(by_id[s.request_id])
                                            for s in done.scheduled if s.samples])
        steps += 1
        assert steps < 2000, "no progress"
    return steps


@pytest.mark.parametrize("seed", range(6))
def test_async_scheduling_gives_the_same_tokens(seed: int) -> None:
    rng = random.Random(seed)
    specs = [(f"r{i}", rng.randint(1, 60), rng.choice([None, 1, 3, 20]))
             for i in range(rng.randint(4, 12))]
    aborts = {rng.randint(1, 30): f"r{rng.randrange(len(specs))}"}
    # 20 blocks hold one max_model_len request: fewer blocks preempt more.
    num_blocks, max_num_seqs = rng.choice([20, 28, 64]), rng.choice([2, 4, 8])
    results = []
    for lag in (False, True):
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=16, max_model_len=80)
        requests = [make_request(name, n, max_tokens=m, first=7 * i)
                    for i, (name, n, m) in enumerate(specs)]
        _run(requests, sched, lag, aborts)
        assert_pool_whole(sched)
        assert all(r.num_pending == 0 for r in requests)
        results.append([(r.output_token_ids, r.status) for r in requests])
    sync, lagged = results
    for (tokens, status), (tokens_async, status_async) in zip(sync, lagged):
        if status is RequestStatus.FINISHED_ABORTED or status_async is \
                RequestStatus.FINISHED_ABORTED:
            continue  # an abort lands at another point of the request's life
        assert (tokens_async, status_async) == (tokens, status)
