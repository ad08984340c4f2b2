"""The app in-process (no uvicorn): engine failures become 500s, and apps keep their own metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.api_server import build_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> Iterator[AsyncLLM]:
    engine = AsyncLLM.from_engine_args(max_model_len=256, max_num_seqs=8,
                                       kv_cache_memory_bytes=32 * 2**20, log_stats=False,
                                       engine_process=False)
    yield engine
    engine.shutdown()


def _fail_next_step(llm: AsyncLLM) -> None:
    runner = llm.core.runner

    def failing_launch(sched, token_masks=None):  # noqa: ANN001, ANN202 - ModelRunner.launch's
        del runner.launch  # the class's method again
        raise RuntimeError("injected failure")

    runner.launch = failing_launch


def test_engine_failure_is_a_500_and_the_server_keeps_serving(llm: AsyncLLM) -> None:
    body = {"prompt": "Hello", "max_tokens": 4}
    with TestClient(build_app(llm)) as client:
        _fail_next_step(llm)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500
        assert "injected failure" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"

        _fail_next_step(llm)
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.status_code == 200  # the status line went out before the failure
        assert events[-1] == "data: [DONE]"
        assert "injected failure" in json.loads(events[-2][len("data: "):])["error"]["message"]

        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_each_app_has_its_own_registry(llm: AsyncLLM) -> None:
    with TestClient(build_app(llm)) as first, TestClient(build_app(llm, api_key="k")) as second:
        assert first.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
                          ).status_code == 200
        assert second.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
                           ).status_code == 401
        for client in (first, second):
            text = client.get("/metrics").text
            assert "pagedllm:kv_cache_total_blocks" in text
