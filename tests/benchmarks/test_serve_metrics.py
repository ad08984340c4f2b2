"""BenchmarkMetrics from hand-made RequestResults with known numbers."""

import math

import pytest

from pagedllm.benchmarks.request_client import RequestResult
from pagedllm.benchmarks.serve_metrics import (
    calculate_metrics,
    format_report,
    output_timeline,
    parse_goodput,
    peak_concurrency,
    percentile_label,
)


def ok(start: float, ttft: float, itl: list[float], latency: float, prompt: int,
       output: int) -> RequestResult:
    return RequestResult(success=True, start_time=start, ttft=ttft, itl=itl, latency=latency,
                         prompt_tokens=prompt, output_tokens=output, usage_reported=True)


@pytest.fixture
def results() -> list[RequestResult]:
    return [
        ok(0.00, 0.1, [0.02, 0.02, 0.02], 0.16, prompt=10, output=4),  # TPOT 60/3 = 20 ms
        ok(0.05, 0.3, [0.05], 0.40, prompt=20, output=3),  # 2 chunks, 3 tokens: TPOT 100/2 = 50
        RequestResult(success=False, error="HTTP 500", prompt_tokens=99),
        ok(0.10, 0.2, [], 0.20, prompt=5, output=1),  # one token: no TPOT
    ]


def test_counts_and_throughputs(results: list[RequestResult]) -> None:
    m = calculate_metrics(results, duration=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input, m.total_output) == (35, 8)  # failed requests count nothing
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.total_token_throughput == pytest.approx(21.5)
    assert m.request_goodput is None


def test_latency_statistics(results: list[RequestResult]) -> None:
    m = calculate_metrics(results, duration=1.0, percentiles=[50, 99])
    assert m.ttft.mean == pytest.approx(200.0)
    assert m.ttft.median == pytest.approx(200.0)
    assert m.tpot.mean == pytest.approx(35.0)  # excludes the first token and 1-token answers
    assert m.tpot.percentiles[99.0] == pytest.approx(20 + 0.99 * 30)
    # ITL pools every chunk gap: [20, 20, 20, 50]; a multi-token chunk is one entry.
    assert m.itl.mean == pytest.approx(27.5)
    assert m.itl.median == pytest.approx(20.0)
    assert m.itl.percentiles[99.0] == pytest.approx(20 + 0.97 * 30)
    assert m.itl.percentiles[50.0] == pytest.approx(20.0)
    assert m.e2el.mean == pytest.approx((160 + 400 + 200) / 3)


def test_peaks(results: list[RequestResult]) -> None:
    m = calculate_metrics(results, duration=1.0)
    assert m.max_concurrent_requests == 3  # at t=0.1 all three successful requests are open
    assert m.max_output_tokens_per_s == pytest.approx(8.0)  # every token in the first second


def test_peak_concurrency_counts_touching_requests_once() -> None:
    back_to_back = [ok(0.0, 0.1, [], 1.0, 1, 1), ok(1.0, 0.1, [], 1.0, 1, 1)]
    assert peak_concurrency(back_to_back) == 1


def test_output_timeline_spreads_a_chunk_s_tokens() -> None:
    # Chunks at 0.5 s, 1.1 s and 1.7 s carrying 6 tokens: 2 per chunk.
    r = ok(0.0, 0.5, [0.6, 0.6], 1.7, prompt=1, output=6)
    starts, per_s = output_timeline([r])
    assert starts.tolist() == [0.0, 1.0]
    assert per_s.tolist() == pytest.approx([2.0, 4.0])
    assert calculate_metrics([r], 1.7).max_output_tokens_per_s == pytest.approx(4.0)


@pytest.mark.parametrize(("slos", "good"), [
    (["ttft:250"], 2), (["tpot:30"], 2), (["e2el:180"], 1), (["ttft:250", "e2el:180"], 1),
    (["ttft:1000", "tpot:1000", "e2el:1000"], 3), (["ttft:0"], 0)])
def test_goodput(results: list[RequestResult], slos: list[str], good: int) -> None:
    m = calculate_metrics(results, duration=2.0, goodput=parse_goodput(slos))
    assert m.request_goodput == pytest.approx(good / 2.0)


def test_parse_goodput_rejects_bad_input() -> None:
    assert parse_goodput(None) is None
    assert parse_goodput(["ttft:200", "e2el:1e4"]) == {"ttft": 200.0, "e2el": 10000.0}
    for bad in (["itl:5"], ["ttft"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_all_failed_gives_zeros() -> None:
    m = calculate_metrics([RequestResult(error="boom")], duration=1.0)
    assert (m.completed, m.failed, m.total_output) == (0, 1, 0)
    assert m.ttft.mean == 0.0 and m.max_output_tokens_per_s == 0.0


def test_missing_usage_is_counted(results: list[RequestResult]) -> None:
    results[0].usage_reported = False
    assert calculate_metrics(results, 1.0).usage_missing == 1


def test_report_and_dict(results: list[RequestResult]) -> None:
    m = calculate_metrics(results, duration=2.0, percentiles=[99.9],
                          goodput={"ttft": 250.0})
    report = format_report(m, ["ttft", "tpot", "itl", "e2el"], max_concurrency=4,
                           request_rate=math.inf)
    lines = report.splitlines()
    assert lines[0] == "{:=^50}".format(" Serving Benchmark Result ")
    assert lines[-1] == "=" * 50
    row = {line[:40].strip(): line[41:].strip() for line in lines if ":" in line}
    assert row["Successful requests:"] == "3"
    assert row["Failed requests:"] == "1"
    assert row["Maximum request concurrency:"] == "4"
    assert row["Total input tokens:"] == "35"
    assert row["Total generated tokens:"] == "8"
    assert row["Request goodput (req/s):"] == "1.00"
    assert row["Mean TTFT (ms):"] == "200.00"
    assert row["Mean TPOT (ms):"] == "35.00"
    assert "P99.9 ITL (ms):" in row and "Median E2EL (ms):" in row
    d = m.to_dict()
    assert d["p99.9_ttft_ms"] == pytest.approx(m.ttft.percentiles[99.9])
    assert d["mean_itl_ms"] == pytest.approx(27.5) and d["completed"] == 3
    assert percentile_label(99.0) == "99" and percentile_label(99.9) == "99.9"
