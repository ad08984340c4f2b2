"""AsyncLLM on the real default model: streaming, batching, aborts that free blocks, failures.

Each test runs its own event loop (``asyncio.run``) against one engine thread, which also shows
that outputs reach whichever loop added the request.
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


def test_step_failure_fails_requests_not_the_engine(llm: AsyncLLM) -> None:
    def fail_next_step(engine) -> None:  # noqa: ANN001 - LLMEngine
        real_step = engine.step

        def failing_step() -> list[RequestOutput]:
            engine.step = real_step
            raise RuntimeError("injected failure")

        engine.step = failing_step

    async def main() -> None:
        gen = llm.generate("Once upon a time", params(100), "doomed")
        await gen.__anext__()
        await llm.call(fail_next_step)
        with pytest.raises(EngineStepError, match="injected failure"):
            async for _ in gen:
                pass
        llm.check_health()
        await assert_pool_whole(llm)
        outs = await collect(llm, "Hi", params(3), "survivor")
        assert outs[-1].finished

    asyncio.run(main())


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

    stat = f"/proc/self/task/{llm._thread.native_id}/stat"
    if not os.path.exists(stat):
        pytest.skip("no /proc to read the engine thread's CPU time")

    def cpu_ticks() -> int:
        with open(stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    time.sleep(1.0)
    assert cpu_ticks() - before <= 2  # asleep on its inbox, not spinning
