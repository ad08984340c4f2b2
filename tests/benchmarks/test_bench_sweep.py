"""bench sweep: one bench serve per setting, a table, a JSON file and the curves."""

import json
import math
from pathlib import Path

import pytest

from pagedllm.benchmarks import datasets
from pagedllm.benchmarks.serve import ServeConfig
from pagedllm.benchmarks.sweep import parse_values, sweep_configs
from pagedllm.entrypoints.cli import main as cli_main


def test_settings() -> None:
    assert parse_values("1, 2,8", int) == [1, 2, 8]
    assert parse_values("0.5,inf", float) == [0.5, math.inf]
    for bad in ("", "0,1", "-2"):
        with pytest.raises(ValueError):
            parse_values(bad, float)
    base = ServeConfig(request_rate=3.0)
    by_c = sweep_configs(base, [1, 4], None)
    assert [(label, c.max_concurrency, c.request_rate) for label, c in by_c] == [
        ("c=1", 1, 3.0), ("c=4", 4, 3.0)]
    by_r = sweep_configs(base, None, [2.0, math.inf])
    assert [(label, c.request_rate) for label, c in by_r] == [("r=2", 2.0), ("r=inf", math.inf)]
    with pytest.raises(ValueError):
        sweep_configs(base, None, None)


@pytest.mark.parametrize("fake_server", [{"delay_s": 0.005}], indirect=True)
def test_cli_concurrency_sweep(fake_server, tokenizer, tmp_path: Path, monkeypatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    plot = tmp_path / "sweep.png"
    rc = cli_main(["bench", "sweep", "--base-url", fake_server.base_url, "--num-prompts", "8",
                   "--random-input-len", "10", "--random-output-len", "6",
                   "--concurrencies", "1,4", "--disable-tqdm", "--metric-percentiles", "50",
                   "--save-result", "--result-dir", str(tmp_path), "--result-filename", "s.json",
                   "--plot", str(plot)])
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["setting", "ok", "fail", "req/s"]
    assert [line.split()[:3] for line in table[2:4]] == [["c=1", "8", "0"], ["c=4", "8", "0"]]
    saved = json.loads((tmp_path / "s.json").read_text())
    points = saved["points"]
    assert [p["max_concurrency"] for p in points] == [1, 4]
    assert [p["max_concurrent_requests"] for p in points] == [1, 4]
    assert all(p["total_output_tokens"] == 8 * 6 and "p99_ttft_ms" in p for p in points)
    assert points[1]["output_throughput"] > points[0]["output_throughput"]
    assert plot.stat().st_size > 10_000


def test_cli_rate_sweep_and_dead_server(fake_server, tokenizer, monkeypatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    args = ["bench", "sweep", "--num-prompts", "4", "--random-input-len", "5",
            "--random-output-len", "3", "--request-rates", "50,inf", "--disable-tqdm"]
    assert cli_main(args + ["--base-url", fake_server.base_url]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert [row.split()[0] for row in rows] == ["r=50", "r=inf"]
    # Nothing listens on port 9 (discard) on loopback: every setting fails, exit status 1.
    assert cli_main(args + ["--base-url", "http://127.0.0.1:9", "--model", "m"]) == 1
