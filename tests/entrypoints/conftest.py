"""One real ``pagedllm serve`` (default model) per test session, in a subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import engine_core_pids, wait_gone

API_KEY = "test-key"
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 64
STARTUP_TIMEOUT = 600.0


@dataclass
class Server:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen
    log_path: str
    startup_seconds: float  # process start -> first answered completion
    api_key: str = API_KEY
    max_model_len: int = MAX_MODEL_LEN
    max_num_seqs: int = MAX_NUM_SEQS

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log_tail(self, n: int = 60) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics: (name, labels without model_name) -> value."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = frozenset((k, v) for k, v in s.labels.items() if k != "model_name")
                out[(s.name, labels)] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                             timeout=300)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                  timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_serving(url: str, process: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, errors="replace") as f:
                pytest.fail(f"server exited with {process.returncode}:\n{f.read()[-5000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail("server did not become healthy in time")


@contextlib.contextmanager
def launch_server(*args: str, max_model_len: int = MAX_MODEL_LEN,
                  max_num_seqs: int = MAX_NUM_SEQS) -> Iterator[Server]:
    """``pagedllm serve`` with the shared test flags plus ``args``, in a subprocess."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w", prefix="pagedllm-serve-", suffix=".log", delete=False)
    # The caller's flags come last: they override the shared ones.
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
           "--kv-cache-memory-bytes", str(512 * 2**20), "--api-key", API_KEY,
           "--disable-uvicorn-access-log", *args]
    start = time.monotonic()
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_until_serving(url, process, log.name)
        first = httpx.post(url + "/v1/completions", timeout=120,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"prompt": "Hi", "max_tokens": 1})
        assert first.status_code == 200, first.text
        startup = time.monotonic() - start
        print(f"\npagedllm serve: first request answered {startup:.1f} s after process start")
        yield Server(url, process, log.name, startup, max_model_len=max_model_len,
                     max_num_seqs=max_num_seqs)
    finally:
        cores = engine_core_pids(process.pid)
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)
        assert not wait_gone(cores, 5.0), "the engine core outlived its server"


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    # float32, the exact path (as the offline LLM): ``serve``'s CPU default, int4 for the Q4_1
    # GGUF, multiplies few rows with the int4 kernel and many with a bf16 GEMM, so a greedy
    # text can differ in its last bits with how its steps were batched, and these tests compare
    # texts across requests. The int4 default is served by the lifecycle and memory tests.
    with launch_server("--dtype", "float32") as running:
        yield running
