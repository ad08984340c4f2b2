"""``pagedllm plan`` with FP8: weights at a byte per linear weight (plus per-channel scales),
the KV cache at a byte per value; quantized checkpoints sized as stored, and refused by name
where the engine cannot load them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pagedllm.entrypoints import cli
from pagedllm.entrypoints.plan import main
from pagedllm.models.arch import ModelArch
from pagedllm.worker import memory as mem

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


def plan(capsys: pytest.CaptureFixture, model: Path, *flags: str) -> tuple[int, dict]:
    argv = ["plan", str(model), "--gpu-memory-gib", "80", "--max-model-len", "8192", *flags,
            "--format", "json"]
    rc = main(cli.build_parser(argv).parse_args(argv))
    return rc, json.loads(capsys.readouterr().out)


def with_quantization_config(tmp_path: Path, quantization_config: dict) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(CONFIGS / "llama-3.1-8b", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_fp8_linear_bytes_of_llama_8b() -> None:
    arch = ModelArch.from_hf_config(json.loads((CONFIGS / "llama-3.1-8b/config.json").read_text()))
    w = mem.weight_bytes_by_dtype(arch)
    # 32 layers x (q 4096 + k, v 1024 each + o 4096 + gate, up 14336 each + down 4096) channels
    rows = 32 * (4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096)
    assert mem.linear_output_rows(arch) == rows
    assert w["fp8"] == w["int8"] + 4 * rows


def test_flags_halve_weights_and_kv(capsys: pytest.CaptureFixture) -> None:
    _, bf16 = plan(capsys, CONFIGS / "llama-3.1-8b")
    rc, fp8 = plan(capsys, CONFIGS / "llama-3.1-8b", "--quantization", "fp8",
                   "--kv-cache-dtype", "fp8")
    assert rc == 0 and fp8["errors"] == []
    assert fp8["weight_format"] == "fp8" and fp8["kv_cache_dtype"] == "fp8"
    assert fp8["memory"]["weight_bytes"] == fp8["weight_bytes"]["fp8"]
    assert fp8["kv_bytes_per_token"] * 2 == bf16["kv_bytes_per_token"] == 128 * 1024
    saved = bf16["memory"]["weight_bytes"] - fp8["memory"]["weight_bytes"]
    assert fp8["kv_cache"]["bytes"] - bf16["kv_cache"]["bytes"] == pytest.approx(saved,
                                                                                 abs=2 << 20)
    assert fp8["kv_cache"]["tokens"] > 2 * bf16["kv_cache"]["tokens"]


def test_fp8_checkpoint_is_sized_as_stored(capsys: pytest.CaptureFixture,
                                           tmp_path: Path) -> None:
    model = with_quantization_config(tmp_path, {"quant_method": "fp8",
                                                "activation_scheme": "dynamic"})
    rc, r = plan(capsys, model)
    assert rc == 0 and r["errors"] == [] and r["weight_format"] == "fp8"
    assert r["memory"]["weight_bytes"] == r["weight_bytes"]["fp8"]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_checkpoint_sized_and_refused(capsys: pytest.CaptureFixture, tmp_path: Path,
                                           method: str) -> None:
    model = with_quantization_config(tmp_path, {"quant_method": method, "bits": 4,
                                                "group_size": 128})
    rc, r = plan(capsys, model)
    assert r["weight_format"] == "int4"
    assert r["memory"]["weight_bytes"] == r["weight_bytes"]["int4"]
    assert rc == 1 and any(f"{method.upper()} int4 checkpoints cannot be loaded" in e
                           for e in r["errors"])
