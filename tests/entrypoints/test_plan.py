"""``pagedllm plan``: the numbers of real configs, warnings with their fix, image costs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedllm.entrypoints import cli
from pagedllm.entrypoints.plan import main

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
GiB = 1 << 30


def plan(capsys: pytest.CaptureFixture, model: str, *flags: str,
         fmt: str = "json") -> tuple[int, dict | str]:
    argv = ["plan", str(CONFIGS / model), *flags, "--format", fmt]
    rc = main(cli.build_parser(argv).parse_args(argv))
    out = capsys.readouterr().out
    return rc, json.loads(out) if fmt == "json" else out


def test_llama_8b_on_80_gib(capsys: pytest.CaptureFixture) -> None:
    rc, r = plan(capsys, "llama-3.1-8b", "--gpu-memory-gib", "80")
    assert rc == 0 and r["errors"] == [] and r["warnings"] == []
    assert (r["device"], r["dtype"]) == ("cuda", "bfloat16")
    assert r["parameters"]["total"] == 8_030_261_248
    assert r["weight_bytes"]["bfloat16"] == 16_060_522_496
    assert r["kv_bytes_per_token"] == 128 * 1024 and r["kv_bytes_per_block"] == 2 * 1024 * 1024
    m = r["memory"]
    assert m["usable_bytes"] == int(0.9 * 80 * GiB)
    # 2048-token step + 256 sampled rows: the sampler dominates (hidden + 256 x 128256 x 40)
    assert m["activation_bytes"] == 2 * 2048 * 4096 + 256 * 128256 * 40 == 1_330_118_656
    assert m["activation_peak_phase"] == "logits"
    # 35 decode graphs (1, 2, 4, 8..256) and 24 of steps with prompt tokens (64..1024 by 64,
    # 1152..2048 by 128): the 2048-token MLP peak + 2 MiB each
    assert m["cuda_graph_bytes"] == 2 * 2048 * (3 * 4096 + 4 * 14336) + 59 * 2 * 1024 * 1024
    left = int(0.9 * 80 * GiB) - 16_060_522_496 - 1_330_118_656 - 408_944_640
    kv = r["kv_cache"]
    assert kv["blocks"] == left // (2 * 1024 * 1024) == 28_376
    assert kv["tokens"] == 28_376 * 16 == 454_016
    assert kv["bytes"] == 28_376 * 2 * 1024 * 1024
    assert kv["max_model_len"] == 131_072 and kv["max_concurrency"] == 3.46
    rows = {c["tokens_per_request"]: c for c in r["concurrency"]}
    assert list(rows) == [1024, 4096, 8192, 16384, 32768, 65536, 131072]
    assert rows[1024]["running_at_once"] == 256  # capped by max_num_seqs
    assert rows[8192]["running_at_once"] == 28_519 // 512 == 55
    b = r["batching"]
    assert (b["max_num_seqs"], b["max_num_batched_tokens"], b["enable_chunked_prefill"]) == (
        256, 2048, True)
    steps = {s["prompt_tokens"]: s["steps"] for s in b["prefill_steps"]}
    assert steps == {512: 1, 2048: 1, 8192: 4, 32768: 16, 131072: 64}


def test_table_format(capsys: pytest.CaptureFixture) -> None:
    rc, out = plan(capsys, "llama-3.1-8b", "--gpu-memory-gib", "80", "--max-model-len", "8192",
                   fmt="table")
    assert rc == 0
    assert "0.9 x 80.00 GiB = 72.00 GiB" in out
    assert "Maximum concurrency for 8,192 tokens per request:" in out


def test_kv_cache_memory_bytes_is_taken_as_is(capsys: pytest.CaptureFixture) -> None:
    rc, r = plan(capsys, "llama-3.1-8b", "--gpu-memory-gib", "80", "--max-model-len", "2048",
                 "--kv-cache-memory-bytes", str(256 * 1024 * 1024))
    assert r["memory"]["kv_cache_source"] == "kv_cache_memory_bytes"
    assert (r["kv_cache"]["blocks"], r["kv_cache"]["tokens"]) == (128, 2048)
    # 256 max_num_seqs cannot all hold a block: a warning with the fix, but the engine starts
    assert rc == 0 and r["errors"] == []
    assert any("--max-num-seqs to 128" in w for w in r["warnings"])


def test_max_model_len_too_large_for_the_cache(capsys: pytest.CaptureFixture) -> None:
    rc, r = plan(capsys, "llama-3.1-8b", "--gpu-memory-gib", "24")
    tokens = r["kv_cache"]["tokens"]
    assert rc == 1 and 0 < tokens < 131072
    [error] = r["errors"]
    assert f"largest max_model_len that fits is {tokens}" in error
    assert f"--max-model-len {tokens}" in error


def test_inconsistent_scheduler_settings_are_errors_with_a_fix(
        capsys: pytest.CaptureFixture) -> None:
    rc, r = plan(capsys, "llama-3.1-8b", "--gpu-memory-gib", "80", "--max-model-len", "8192",
                 "--max-num-seqs", "128", "--max-num-batched-tokens", "64")
    assert rc == 1
    assert "Fix: --max-num-batched-tokens 128 or --max-num-seqs 64." in r["errors"][0]
    assert r["batching"]["max_num_batched_tokens"] == 64  # still planned with the user's value
    rc, r = plan(capsys, "llama-3.1-8b", "--gpu-memory-gib", "80", "--max-model-len", "8192",
                 "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096")
    assert rc == 1 and "--enable-chunked-prefill" in r["errors"][0]
    steps = {s["prompt_tokens"]: s["steps"] for s in r["batching"]["prefill_steps"]}
    assert steps[2048] == 1 and steps[8192] is None  # longer than the budget: rejected


def test_qwen2_vl_images(capsys: pytest.CaptureFixture) -> None:
    rc, r = plan(capsys, "qwen2-vl-7b-instruct", "--gpu-memory-gib", "80",
                 "--max-model-len", "32768", "--image-size", "1280x720")
    assert rc == 0 and r["errors"] == []
    assert r["parameters"] == {"decoder": 7_615_616_512, "vision": 675_759_104,
                               "total": 8_291_375_616}
    assert r["kv_bytes_per_token"] == 56 * 1024
    image, bound = r["images"]
    assert image == {"image": "1280x720", "resized": "1288x728", "image_tokens": 1196,
                     "prompt_tokens": 1198, "context_left": 32768 - 1198,
                     "max_images_per_request": 27, "prefill_steps": 1}
    assert bound["image_tokens"] == 1280  # max_pixels / 28^2
    rc, r = plan(capsys, "qwen2-vl-7b-instruct", "--gpu-memory-gib", "80",
                 "--max-model-len", "1024", "--image-size", "1280x720")
    assert any("1198 tokens, more than max_model_len (1024)" in w for w in r["warnings"])


def test_cpu_plan_uses_float32_and_the_given_cache(capsys: pytest.CaptureFixture) -> None:
    rc, r = plan(capsys, "qwen3-0.6b", "--device", "cpu", "--max-model-len", "4096",
                 "--kv-cache-memory-bytes", str(GiB))
    assert rc == 0
    assert (r["device"], r["dtype"]) == ("cpu", "float32")
    assert r["kv_bytes_per_token"] == 224 * 1024  # 28 x 2 x 8 x 128 x 4 bytes
    assert r["kv_cache"]["tokens"] == GiB // (224 * 1024 * 16) * 16
    assert r["memory"]["cuda_graph_bytes"] == 0


@pytest.mark.parametrize(("flags", "weights"), [([], "int4"), (["--dtype", "float32"], "float32")])
def test_cpu_plan_of_the_default_gguf_takes_serves_default(
        capsys: pytest.CaptureFixture, flags: list[str], weights: str) -> None:
    """As `serve` does, the plan runs the default Q4_1 GGUF in int4 on the CPU unless told
    otherwise, and budgets int4's bfloat16 copies (tests/quantization checks the byte count
    against a loaded model)."""
    assert cli.main(["plan", "--device", "cpu", *flags, "--format", "json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weight_format"] == weights
    assert r["memory"]["weight_bytes"] == r["weight_bytes"][weights]
    assert r["weight_bytes"]["int4"] > r["weight_bytes"]["bfloat16"]  # integers + bf16 copy


def test_cuda_without_a_gpu_asks_for_its_size(capsys: pytest.CaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="--gpu-memory-gib"):
        plan(capsys, "llama-3.2-1b", "--device", "cuda")


@pytest.mark.slow
def test_engine_start_up_agrees_with_the_plan(capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """One source of truth: the default model on CPU, same flags, same KV cache numbers."""
    import logging

    from pagedllm import LLM

    flags = {"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 2048, "block_size": 16}
    assert cli.main(["plan", "--kv-cache-memory-bytes", str(flags["kv_cache_memory_bytes"]),
                     "--max-model-len", "2048", "--format", "json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        llm = LLM(**flags)
    assert llm.engine.core.kv_cache.pool.num_blocks == kv["blocks"]
    logged = caplog.text
    assert f"KV cache size: {kv['tokens']:,} tokens" in logged
    assert f"Maximum concurrency for 2,048 tokens per request: {kv['max_concurrency']:.2f}x" \
        in logged
    assert f"Available KV cache memory: {kv['gib']:.2f} GiB" in logged


# Mistral-7B-v0.1's shape: a 4096 window on all 32 layers, 128 KiB of KV cache per token.
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
              "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


def _config(tmp_path: Path, **config: object) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_sliding_window_on_every_layer_bounds_what_a_request_holds(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Concurrency counts what a request holds at most: the blocks of its window less the
    query and one step's tokens (4095 + 2048 positions), one more for a straddled boundary, as
    vLLM counts them. 2 GiB hold 16,384 tokens: a full-attention 32k request would not fit."""
    rc, r = plan(capsys, _config(tmp_path, **MISTRAL_7B), "--gpu-memory-gib", "80",
                 "--kv-cache-memory-bytes", str(2 * GiB))
    assert rc == 0 and r["errors"] == []
    kv = r["kv_cache"]
    held = (-(-(4095 + 2048) // 16) + 1) * 16
    assert (kv["sliding_window"], kv["tokens_held_per_request"]) == (4096, held) == (4096, 6160)
    assert kv["tokens"] == 16_384 and kv["max_model_len"] == 32_768
    assert kv["max_concurrency"] == round(16_384 / held, 2) == 2.66
    rows = {c["tokens_per_request"]: c for c in r["concurrency"]}
    assert rows[1024]["max_concurrency"] == 16.0  # shorter than the window: all its blocks
    assert rows[32768]["running_at_once"] == 1024 // (held // 16) == 2
    rc, out = plan(capsys, _config(tmp_path, **MISTRAL_7B), "--gpu-memory-gib", "80",
                   "--kv-cache-memory-bytes", str(2 * GiB), fmt="table")
    assert "sliding window of 4,096 on every layer: a request holds at most 6,160 tokens" in out


def test_mixed_sliding_and_full_layers_hold_every_block(capsys: pytest.CaptureFixture,
                                                        tmp_path: Path) -> None:
    """Gemma 2's full layers read the whole context: its requests keep all their blocks."""
    gemma2 = {**MISTRAL_7B, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
              "head_dim": 128, "max_position_embeddings": 8192}
    rc, r = plan(capsys, _config(tmp_path, **gemma2), "--gpu-memory-gib", "80",
                 "--kv-cache-memory-bytes", str(GiB))
    kv = r["kv_cache"]
    assert rc == 0 and kv["sliding_window"] == 0 and kv["tokens_held_per_request"] == 8192
    assert kv["max_concurrency"] == 1.0


def test_start_up_log_reports_the_sliding_window_figure(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from pagedllm.models.arch import ModelArch
    from pagedllm.worker import memory as mem

    arch = ModelArch.from_hf_config(MISTRAL_7B)
    kv_plan = mem.plan_kv_cache(arch, "bfloat16", 16, 32768, 2 * GiB, 2048)
    with caplog.at_level(logging.INFO):
        mem.log_kv_cache_plan(kv_plan, logging.getLogger("pagedllm.test"))
    assert "a request holds at most 6,160 KV cache tokens" in caplog.text
    assert "Maximum concurrency for 32,768 tokens per request: 2.66x" in caplog.text
    with pytest.raises(ValueError, match="max seq len"):  # full attention would not fit
        mem.plan_kv_cache(ModelArch.from_hf_config({**MISTRAL_7B, "sliding_window": None}),
                          "bfloat16", 16, 32768, 2 * GiB, 2048)
