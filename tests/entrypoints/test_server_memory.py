"""The server's memory after load (issue 15): once every KV cache block has been used, bursts
of requests leave the resident memory where it was, every request is answered and every block
returns to the pool. (The KV cache's pages become resident on first use, up to its size: a
small cache here, so that the first burst touches all of it. benchmarks/memory_soak.py runs the
20-minute version.)"""

from __future__ import annotations

import asyncio
import random
import time

from tests.entrypoints.conftest import Server, launch_server
from tests.processes import engine_core_pids, resident_mib

KV_CACHE_BYTES = 48 << 20  # ~1,000 tokens of the default model in float32: 60-odd blocks
BURSTS = 4  # the first is the warm-up
REQUESTS_PER_BURST = 24
GROWTH_LIMIT_MIB = 40.0


async def burst(server: Server, rng: random.Random) -> list[str]:
    client = server.async_client()
    words = "one two three four five six seven eight nine ten".split()

    async def one() -> str:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
        out = await client.completions.create(model="", prompt=prompt, temperature=0.0,
                                              max_tokens=rng.randint(4, 16))
        return out.choices[0].finish_reason

    try:
        return await asyncio.gather(*(one() for _ in range(REQUESTS_PER_BURST)))
    finally:
        await client.close()


def wait_idle(server: Server) -> None:
    deadline = time.monotonic() + 30
    while server.metric("pagedllm:num_requests_running") or server.metric(
            "pagedllm:num_requests_waiting"):
        assert time.monotonic() < deadline, "requests still in the engine"
        time.sleep(0.2)
    time.sleep(1.5)  # the core trims its heap as it goes idle


def test_resident_memory_is_flat_after_warm_up() -> None:
    with launch_server("--kv-cache-memory-bytes", str(KV_CACHE_BYTES)) as server:
        (core,) = engine_core_pids(server.process.pid)
        rng = random.Random(0)
        resident = []
        for _ in range(BURSTS):
            reasons = asyncio.run(burst(server, rng))
            assert sorted(set(reasons)) <= ["length", "stop"], reasons
            wait_idle(server)
            resident.append((resident_mib(server.process.pid), resident_mib(core)))
        metrics = server.metrics()
        free, total = (metrics[(f"pagedllm:kv_cache_{k}_blocks", frozenset())]
                       for k in ("free", "total"))
        assert free == total > 0
        api, engine = zip(*resident[1:], strict=True)
        assert max(engine) - engine[0] < GROWTH_LIMIT_MIB, resident
        assert max(api) - api[0] < GROWTH_LIMIT_MIB, resident
