"""bench serve end to end: the real client against an in-test streaming server (conftest.py)."""

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pagedllm.benchmarks import datasets
from pagedllm.benchmarks.datasets import (
    SampleRequest,
    sample_random_mm_requests,
    sample_random_requests,
)
from pagedllm.benchmarks.request_client import RequestInput, send_request
from pagedllm.benchmarks.serve import ServeConfig, arrival_gaps, run_benchmark, run_requests
from pagedllm.entrypoints.cli import main as cli_main
from tests.benchmarks.conftest import IMAGE_TOKENS


def _report_rows(text: str) -> dict[str, str]:
    return {line[:40].strip(): line[41:].strip() for line in text.splitlines()
            if line.endswith(" ") or ":" in line[:41]}


def _requests(n: int, output_len: int = 6) -> list[SampleRequest]:
    return [SampleRequest(f"prompt number {i} " + "x " * i, 0, output_len + i % 3)
            for i in range(n)]


@pytest.mark.parametrize("fake_server", [{"tokens_per_chunk": 2}], indirect=True)
def test_client_times_chunks_and_reads_usage(fake_server) -> None:
    reqs = _requests(4, output_len=7)  # 7, 8, 9, 7 tokens in chunks of 2
    run = asyncio.run(run_requests(reqs, ServeConfig(fake_server.base_url, disable_tqdm=True)))
    assert run.model == "fake-model"
    for req, res in zip(reqs, run.results, strict=True):
        assert res.success and res.usage_reported and not res.error
        assert res.output_tokens == req.expected_output_len
        assert res.prompt_tokens == fake_server.prompt_tokens(req.prompt)
        assert len(res.itl) == math.ceil(req.expected_output_len / 2) - 1  # one per chunk
        assert 0 < res.ttft < res.latency
        assert res.ttft + sum(res.itl) <= res.latency + 1e-9
        assert res.generated_text == " tok" * req.expected_output_len
    payload = fake_server.payloads[-1]
    assert payload["stream"] and payload["stream_options"] == {"include_usage": True}
    assert payload["model"] == "fake-model" and "ignore_eos" not in payload


def test_chat_endpoint_skips_the_role_chunk(fake_server) -> None:
    config = ServeConfig(fake_server.base_url, "/v1/chat/completions", model="m",
                         ignore_eos=True, disable_tqdm=True)
    run = asyncio.run(run_requests(_requests(2, output_len=5), config))
    assert [len(r.itl) for r in run.results] == [4, 5]  # 5 and 6 one-token chunks
    assert all(r.generated_text.startswith(" tok") for r in run.results)
    payload = fake_server.payloads[-1]
    assert payload["messages"][0]["role"] == "user" and payload["ignore_eos"] is True


@pytest.mark.parametrize("fake_server", [{"send_usage": False}], indirect=True)
def test_without_usage_counts_are_flagged_estimates(fake_server) -> None:
    reqs = [SampleRequest("a b c", prompt_len=4, expected_output_len=5)]
    run = asyncio.run(run_requests(reqs, ServeConfig(fake_server.base_url, disable_tqdm=True)))
    r = run.results[0]
    assert r.success and not r.usage_reported
    assert (r.output_tokens, r.prompt_tokens) == (5, 4)  # text chunks; the client's estimate


def test_failures_are_reported_not_raised(fake_server) -> None:
    reqs = _requests(3) + [SampleRequest("please FAIL", 3, 4)]
    metrics = asyncio.run(run_benchmark(reqs, ServeConfig(fake_server.base_url,
                                                          disable_tqdm=True)))
    assert (metrics.completed, metrics.failed) == (3, 1)
    failed = asyncio.run(_send_one(fake_server.base_url, "FAIL"))
    assert not failed.success and failed.error.startswith("HTTP 500")


async def _send_one(base_url: str, prompt: str):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await send_request(session, RequestInput(f"{base_url}/v1/completions", "m",
                                                        prompt, 3))


def test_probe_failure_raises(fake_server) -> None:
    with pytest.raises(RuntimeError, match="test request"):
        asyncio.run(run_requests([SampleRequest("FAIL", 1, 1)],
                                 ServeConfig(fake_server.base_url, disable_tqdm=True)))


@pytest.mark.parametrize("fake_server", [{"delay_s": 0.01}], indirect=True)
def test_max_concurrency_is_respected(fake_server) -> None:
    config = ServeConfig(fake_server.base_url, max_concurrency=2, num_warmups=3,
                         disable_tqdm=True)
    metrics = asyncio.run(run_benchmark(_requests(8), config))
    assert fake_server.max_in_flight == 2
    assert metrics.max_concurrent_requests == 2
    assert len(fake_server.payloads) == 1 + 3 + 8  # probe, warm-ups, benchmark


def test_arrival_gaps() -> None:
    assert arrival_gaps(5, math.inf, 1.0, 0).tolist() == [0.0] * 5
    gaps = arrival_gaps(20000, 4.0, 1.0, 0)
    assert gaps[0] == 0.0
    assert gaps[1:].mean() == pytest.approx(0.25, rel=0.03)
    assert gaps[1:].std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    steady = arrival_gaps(20000, 4.0, 4.0, 0)[1:]  # gamma shape 4: variance / 4
    assert steady.mean() == pytest.approx(0.25, rel=0.03)
    assert steady.std() == pytest.approx(0.125, rel=0.05)
    assert np.array_equal(arrival_gaps(10, 2.0, 0.5, 3), arrival_gaps(10, 2.0, 0.5, 3))


def test_cli_end_to_end(fake_server, tokenizer, tmp_path: Path, monkeypatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    plot = tmp_path / "serve.png"
    rc = cli_main(["bench", "serve", "--base-url", fake_server.base_url, "--num-prompts", "12",
                   "--random-input-len", "20", "--random-output-len", "8",
                   "--random-range-ratio", "0.5", "--random-prefix-len", "4",
                   "--request-rate", "200", "--seed", "3", "--disable-tqdm",
                   "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                   "--goodput", "ttft:60000", "e2el:60000", "--save-result",
                   "--result-dir", str(tmp_path), "--result-filename", "r.json",
                   "--plot", str(plot)])
    assert rc == 0
    expected = sample_random_requests(tokenizer, 12, 20, 8, 0.5, 4, seed=3)
    out = capsys.readouterr().out
    assert "{:=^50}".format(" Serving Benchmark Result ") in out
    rows = _report_rows(out)
    assert rows["Successful requests:"] == "12" and rows["Failed requests:"] == "0"
    total_in = sum(fake_server.prompt_tokens(r.prompt) for r in expected)
    total_out = sum(r.expected_output_len for r in expected)
    assert int(rows["Total input tokens:"]) == total_in
    assert int(rows["Total generated tokens:"]) == total_out
    assert rows["Request goodput (req/s):"] == rows["Request throughput (req/s):"]
    for key in ("P50 TTFT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):", "Median E2EL (ms):"):
        assert float(rows[key]) > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["completed"] == 12 and saved["total_output_tokens"] == total_out
    assert saved["request_rate"] == 200.0 and saved["model_id"] == "fake-model"
    assert sorted(saved["output_lens"]) == sorted(r.expected_output_len for r in expected)
    assert "p99_e2el_ms" in saved and len(saved["itls"]) == 12
    assert plot.stat().st_size > 10_000


def test_cli_rejects_bad_flags(fake_server, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    base = ["bench", "serve", "--base-url", fake_server.base_url, "--disable-tqdm"]
    assert cli_main(base + ["--percentile-metrics", "ttft,foo"]) == 2
    assert cli_main(base + ["--goodput", "itl:5"]) == 2
    assert cli_main(base + ["--dataset-name", "sharegpt"]) == 2  # no --dataset-path
    assert cli_main(base + ["--request-rate", "0"]) == 2


def test_cli_random_mm_sends_images_to_the_chat_endpoint(fake_server, tokenizer, monkeypatch,
                                                          capsys) -> None:
    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    rc = cli_main(["bench", "serve", "--base-url", fake_server.base_url, "--disable-tqdm",
                   "--dataset-name", "random-mm", "--num-prompts", "4",
                   "--random-input-len", "6", "--random-output-len", "3",
                   "--random-mm-base-items-per-request", "2",
                   "--random-mm-bucket-config", "{(28, 28, 1): 1.0}", "--seed", "5"])
    assert rc == 0
    content = fake_server.payloads[-1]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["text", "image_url", "image_url"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    expected = sample_random_mm_requests(tokenizer, 4, 6, 3, base_items_per_request=2,
                                         bucket_config="{(28, 28, 1): 1.0}", seed=5)
    assert content[0]["text"] == expected[-1].prompt
    assert tuple(p["image_url"]["url"] for p in content[1:]) == expected[-1].images
    # The report counts the server's prompt tokens, image tokens included.
    rows = _report_rows(capsys.readouterr().out)
    assert int(rows["Total input tokens:"]) == sum(
        fake_server.prompt_tokens(r.prompt) + 2 * IMAGE_TOKENS for r in expected)


def test_random_mm_needs_the_chat_endpoint(fake_server, tokenizer, monkeypatch, caplog) -> None:
    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    base = ["bench", "serve", "--base-url", fake_server.base_url, "--disable-tqdm",
            "--dataset-name", "random-mm", "--num-prompts", "1"]
    assert cli_main(base + ["--endpoint", "/v1/completions"]) == 2
    assert "use --endpoint /v1/chat/completions" in caplog.text
    assert cli_main(base + ["--random-mm-bucket-config", "{(28, 28, 4): 1.0}"]) == 2
    assert "only images" in caplog.text
    assert not fake_server.payloads  # refused before sending anything
    with pytest.raises(ValueError, match="chat endpoint"):
        RequestInput(f"{fake_server.base_url}/v1/completions", "m", "hi", 3,
                     images=("data:image/png;base64,",))
