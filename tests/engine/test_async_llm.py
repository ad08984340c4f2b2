"""AsyncLLM on the real default model: streaming, batching, aborts that free blocks, failures.

Each test runs its own event loop (``asyncio.run``) against one engine (its core in a child
process), which also shows that outputs reach whichever loop added the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator

import pytest

from pagedllm.engine.async_llm import AsyncLLM, EngineStepError
from pagedllm.metrics.stats import IterationStats, SchedulerStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

pytestmark = pytest.mark.slow

LOG_INTERVAL = 0.5
DELTA, FINAL = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


class StepRecorder:
    def __init__(self) -> None:
        self.step_sizes: list[int] = []

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        if iteration.step_num_reqs is not None:
            self.step_sizes.append(iteration.step_num_reqs)


@pytest.fixture(scope="module")
def llm() -> Iterator[AsyncLLM]:
    engine = AsyncLLM.from_engine_args(max_model_len=512, max_num_seqs=16,
                                       kv_cache_memory_bytes=64 * 2**20, log_stats=True)
    engine._log.interval = LOG_INTERVAL  # type: ignore[union-attr]
    yield engine
    engine.shutdown()


def params(max_tokens: int = 8, kind: RequestOutputKind = DELTA) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                          output_kind=kind)


async def collect(llm: AsyncLLM, prompt: str, p: SamplingParams,
                  request_id: str) -> list[RequestOutput]:
    return [out async for out in llm.generate(prompt, p, request_id)]


async def assert_pool_whole(llm: AsyncLLM) -> None:
    # Commands run in order on the engine thread: anything aborted before is done by now.
    stats = await llm.get_stats()
    assert stats.num_running_reqs == stats.num_waiting_reqs == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_deltas_add_up_to_the_final_output(llm: AsyncLLM) -> None:
    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        deltas = await collect(llm, "Hello, my name is", params(8, DELTA), "delta")
        final = await collect(llm, "Hello, my name is", params(8, FINAL), "final")
        return deltas, final

    deltas, final = asyncio.run(main())
    assert len(final) == 1 and final[0].finished
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert "".join(d.outputs[0].text for d in deltas) == final[0].outputs[0].text
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 8
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_concurrent_requests_are_batched(llm: AsyncLLM) -> None:
    recorder = StepRecorder()
    llm.add_stat_logger(recorder)

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(llm, f"Prompt number {i}:", params(6), f"b{i}")
                                      for i in range(8)))

    results = asyncio.run(main())
    assert all(sum(len(o.outputs[0].token_ids) for o in outs) == 6 for outs in results)
    assert max(recorder.step_sizes) >= 4  # continuous batching, not one request at a time


def test_bad_request_raises_before_any_output(llm: AsyncLLM) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="512"):
            await collect(llm, "hello " * 600, params(), "too-long")
        running = llm.generate("A long story:", params(200), "dup")
        await running.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(llm, "Hi", params(), "dup")
        await running.aclose()  # abandoning the generator aborts the request
        await assert_pool_whole(llm)
        outs = await collect(llm, "Hi", params(3), "after")
        assert outs[-1].finished

    asyncio.run(main())


def test_cancelled_requests_free_their_blocks_at_once(llm: AsyncLLM) -> None:
    async def main() -> None:
        seen = [0] * 8

        async def consume(i: int) -> None:
            async for _ in llm.generate(f"Story {i}:", params(400), f"cancel{i}"):
                seen[i] += 1

        tasks = [asyncio.create_task(consume(i)) for i in range(8)]
        while min(seen) == 0:
            await asyncio.sleep(0.01)
        stats = await llm.get_stats()
        assert stats.num_running_reqs == 8 and stats.num_free_blocks < stats.num_total_blocks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await assert_pool_whole(llm)
        outs = await collect(llm, "Hi", params(3), "after-cancel")
        assert outs[-1].finished

    asyncio.run(main())


@pytest.fixture(scope="module")
def inproc() -> Iterator[AsyncLLM]:
    """The engine core on a thread of this process, so that a test can reach inside it."""
    engine = AsyncLLM.from_engine_args(max_model_len=512, max_num_seqs=64,
                                       kv_cache_memory_bytes=64 * 2**20, log_stats=False,
                                       engine_process=False)
    yield engine
    engine.shutdown()


def poison(llm: AsyncLLM, request_id: str) -> None:
    """Makes every step that computes ``request_id`` fail at launch, as a bad input would."""
    runner = llm.core.runner
    real_launch = runner.launch

    def launch(sched, token_masks=None):  # noqa: ANN001, ANN202 - ModelRunner.launch's
        if any(s.request_id == request_id for s in sched.scheduled):
            raise RuntimeError(f"injected failure of {request_id}")
        return real_launch(sched, token_masks)

    runner.launch = launch


def test_a_failing_request_ends_alone(inproc: AsyncLLM) -> None:
    """One poisoned request among 32 concurrent ones: its step is run again request by request,
    so only it fails; the 31 others finish whole, and the engine serves on."""
    poison(inproc, "poisoned")

    async def main() -> list[list[RequestOutput] | BaseException]:
        ids = [f"ok{i}" for i in range(31)]
        ids.insert(13, "poisoned")
        return await asyncio.gather(*(collect(inproc, f"Story {i}:", params(12), rid)
                                      for i, rid in enumerate(ids)), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        del inproc.core.runner.launch  # back to the class's method
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], EngineStepError)
    assert "injected failure of poisoned" in str(failed[0])
    assert isinstance(results[13], EngineStepError)
    for outs in results[:13] + results[14:]:
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 12
    inproc.check_health()
    asyncio.run(assert_pool_whole(inproc))
    assert not inproc.core.scheduler.requests  # nothing leaked
    outs = asyncio.run(collect(inproc, "Hi", params(3), "survivor"))
    assert outs[-1].finished


def test_event_loop_is_not_blocked_by_engine_work(llm: AsyncLLM) -> None:
    async def main() -> list[float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.gather(*(collect(llm, f"Tick {i}:", params(8), f"tick{i}")
                               for i in range(3)))
        done.set()
        await task
        return gaps

    gaps = asyncio.run(main())
    assert len(gaps) > 20 and max(gaps) < 0.5


def test_periodic_log_line_then_quiet_idle(llm: AsyncLLM, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    caplog.set_level(logging.INFO, logger="pagedllm.metrics")
    asyncio.run(collect(llm, "Log me:", params(4), "logged"))
    time.sleep(3 * LOG_INTERVAL)
    lines = [r.getMessage() for r in caplog.records if "Avg prompt throughput" in r.getMessage()]
    assert lines, "no periodic stats line"
    assert "Running: 0 reqs, Waiting: 0 reqs" in lines[-1] and "Prefix cache hit rate" in lines[-1]

    # Neither the front-end thread nor the engine core process spins while idle.
    stats = [f"/proc/self/task/{llm._thread.native_id}/stat", f"/proc/{llm.client.proc.pid}/stat"]
    if not all(os.path.exists(stat) for stat in stats):
        pytest.skip("no /proc to read the CPU time of the engine's thread and process")

    def cpu_ticks(stat: str) -> int:
        with open(stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = [cpu_ticks(stat) for stat in stats]
    time.sleep(1.0)
    for stat, ticks in zip(stats, before):
        assert cpu_ticks(stat) - ticks <= 2, stat  # asleep in a poll, not spinning


def test_a_request_the_core_cannot_receive_fails_alone(llm: AsyncLLM) -> None:
    """A value the engine core's messages cannot carry (an id past 64 bits) fails that request
    with a ValueError; the engine and the next request are unharmed."""
    bad = SamplingParams(max_tokens=4, stop_token_ids=[2**70])

    async def run() -> list[RequestOutput]:
        with pytest.raises(ValueError, match="could not be sent to the engine"):
            await collect(llm, "Hello", bad, "unsendable")
        return await collect(llm, "Hello", params(4, FINAL), "after-unsendable")

    outs = asyncio.run(run())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
    asyncio.run(assert_pool_whole(llm))
