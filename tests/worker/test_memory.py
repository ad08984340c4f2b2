"""Memory sizing: exact arithmetic on real configs, parameter counts against transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pagedllm.models.arch import ModelArch
from pagedllm.worker import memory as mem

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
GiB = 1 << 30


def load(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def arch(name: str) -> ModelArch:
    return ModelArch.from_hf_config(load(name))


def test_dtype_bytes() -> None:
    assert mem.dtype_bytes("bfloat16") == mem.dtype_bytes("bf16") == 2
    assert mem.dtype_bytes(torch.float32) == mem.dtype_bytes("torch.float32") == 4
    assert mem.dtype_bytes(torch.float16) == mem.dtype_bytes("half") == 2
    assert mem.dtype_bytes("int8") == 1
    with pytest.raises(ValueError, match="auto"):
        mem.dtype_bytes("auto")


@pytest.mark.parametrize("name, per_token", [
    ("llama-3.1-8b", 128 * 1024),  # 32 layers x 2 x 8 kv heads x 128 x 2 bytes
    ("llama-3.2-1b", 32 * 1024),  # 16 x 2 x 8 x 64 x 2
    ("qwen3-0.6b", 112 * 1024),  # 28 x 2 x 8 x 128 x 2
    ("qwen2-vl-7b-instruct", 56 * 1024),  # 28 x 2 x 4 x 128 x 2
])
def test_kv_bytes_per_token(name: str, per_token: int) -> None:
    assert mem.kv_bytes_per_token(arch(name), torch.bfloat16) == per_token
    assert mem.kv_bytes_per_token(arch(name), "float32") == 2 * per_token


def _hf_numel(config: dict) -> int:
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, config["architectures"][0])
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **{
        k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = cls(hf_config)
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


@pytest.mark.parametrize("name, total", [
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
    ("qwen3-0.6b", 596_049_920), ("qwen2-vl-7b-instruct", 8_291_375_616)])
def test_parameter_counts_match_transformers(name: str, total: int) -> None:
    config = load(name)
    vision = config.get("vision_config")
    ours = mem.count_parameters(arch(name)) + (
        mem.count_vision_parameters(vision) if vision else 0)
    assert ours == total == _hf_numel(config)


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=128)


@pytest.mark.parametrize("arch_name, model_type, extra", [
    ("LlamaForCausalLM", "llama", {"tie_word_embeddings": False}),
    ("LlamaForCausalLM", "llama", {"attention_bias": True, "tie_word_embeddings": True}),
    ("LlamaForCausalLM", "llama", {"head_dim": 32}),  # head_dim != hidden / heads
    ("Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    ("Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": False}),
    ("Qwen3ForCausalLM", "qwen3", {"head_dim": 24, "tie_word_embeddings": True}),
    ("Qwen3ForCausalLM", "qwen3", {"head_dim": 16, "attention_bias": True,
                                   "tie_word_embeddings": False}),
])
def test_parameter_counts_of_variants(arch_name: str, model_type: str, extra: dict) -> None:
    config = {"architectures": [arch_name], "model_type": model_type, **TINY, **extra}
    assert mem.count_parameters(ModelArch.from_hf_config(config)) == _hf_numel(config)


def test_weight_bytes_by_dtype() -> None:
    a = arch("llama-3.1-8b")
    w = mem.weight_bytes_by_dtype(a)
    assert w["bfloat16"] == w["float16"] == 2 * 8_030_261_248
    assert w["float32"] == 4 * 8_030_261_248
    linear = mem.parameter_breakdown(a).linear
    assert w["int8"] == w["bfloat16"] - linear  # linear layers at 1 byte instead of 2
    assert w["int4"] == w["bfloat16"] - linear * 2 + linear // 2 + linear * 2 // 128


def test_activation_estimate_llama_8b() -> None:
    a = arch("llama-3.1-8b")
    phases = mem.activation_phases(a, 2048, 256, torch.bfloat16)
    # mlp: 2 bytes x 2048 tokens x (3 x 4096 residuals/normed + 4 x 14336 gate, up, silu, product)
    assert phases["mlp"] == 2 * 2048 * (3 * 4096 + 4 * 14336) == 285_212_672
    # logits: final hidden + 256 rows x 128256 logits x 40 sampler bytes
    assert phases["logits"] == 2 * 2048 * 4096 + 256 * 128256 * 40
    assert "qk_norm" not in phases
    assert mem.activation_bytes_estimate(a, 2048, 256, "bf16") == phases["logits"]
    # long prefills are MLP-bound; fewer tokens than max_num_seqs sample fewer rows
    assert max(mem.activation_phases(a, 16384, 1, "bf16").items(),
               key=lambda kv: kv[1])[0] == "mlp"
    assert mem.activation_phases(a, 8, 256, "bf16")["logits"] == 2 * 8 * 4096 + 8 * 128256 * 40


def test_activation_estimate_has_qk_norm_for_qwen3() -> None:
    assert "qk_norm" in mem.activation_phases(arch("qwen3-0.6b"), 512, 1, "bf16")


def test_cuda_graph_sizes_and_reserve() -> None:
    sizes = mem.default_cuda_graph_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert mem.default_cuda_graph_sizes(3) == [1, 2, 3]
    assert mem.default_cuda_graph_sizes(1000)[-1] == 512
    a = arch("llama-3.1-8b")
    assert mem.cuda_graph_reserve_estimate(a, "bf16", []) == 0
    # the pool holds the 256-token forward's MLP peak; plus 2 MiB per captured size
    assert mem.cuda_graph_reserve_estimate(a, "bf16", sizes) == (
        2 * 256 * (3 * 4096 + 4 * 14336) + 35 * (2 << 20))


def test_mixed_graph_sizes() -> None:
    sizes = mem.default_mixed_graph_sizes(2048, 1)
    assert sizes[:3] == [64, 128, 192] and sizes[15:17] == [1024, 1152] and sizes[-1] == 2048
    assert len(sizes) == 24
    assert mem.default_mixed_graph_sizes(8192, 1)[-1] == 2048  # larger steps run eagerly
    assert mem.default_mixed_graph_sizes(500, 1)[-2:] == [448, 500]  # up to the step budget
    assert mem.default_mixed_graph_sizes(2048, 2) == []  # not with tensor parallelism yet


def test_plan_kv_cache_exact() -> None:
    a = arch("llama-3.1-8b")  # 2 MiB per 16-token block in bf16
    plan = mem.plan_kv_cache(a, torch.bfloat16, 16, 8192, GiB + 12345)
    assert (plan.bytes_per_block, plan.num_blocks, plan.num_tokens) == (2 << 20, 512, 8192)
    assert plan.kv_cache_bytes == 512 * (2 << 20) == GiB
    assert plan.max_concurrency == 1.0 and plan.largest_fitting_len == 8192
    assert plan.concurrency_at(1024) == 8.0


def test_plan_kv_cache_too_small_says_what_fits() -> None:
    a = arch("llama-3.1-8b")
    with pytest.raises(ValueError) as err:
        mem.plan_kv_cache(a, torch.bfloat16, 16, 8192, GiB - 1)
    msg = str(err.value)
    assert "max seq len (8192) is larger than the maximum number of tokens" in msg
    assert "stored in KV cache (8176)" in msg  # 511 blocks of 16
    assert "largest max_model_len that fits is 8176" in msg
    assert "`gpu_memory_utilization` / `kv_cache_memory_bytes`" in msg
    assert "--max-model-len 8176" in msg


def test_gpu_kv_cache_budget() -> None:
    left = mem.gpu_kv_cache_budget(80 * GiB, 0.9, 15 * GiB, GiB, GiB // 2, other_bytes=GiB // 2)
    assert left == int(72 * GiB) - 17 * GiB
    with pytest.raises(ValueError) as err:
        mem.gpu_kv_cache_budget(16 * GiB, 0.9, 15 * GiB, GiB, 0)
    assert "14.40 GiB" in str(err.value) and "weights take 15.00 GiB" in str(err.value)


def test_log_kv_cache_plan(caplog: pytest.LogCaptureFixture) -> None:
    plan = mem.plan_kv_cache(arch("llama-3.1-8b"), "bf16", 16, 4096, 2 * GiB)
    logger = logging.getLogger("test.memory")
    with caplog.at_level(logging.INFO, logger="test.memory"):
        mem.log_kv_cache_plan(plan, logger, "cuda")
        mem.log_kv_cache_plan(plan, logger, "cpu")
    assert caplog.messages == [
        "Available KV cache memory: 2.00 GiB", "GPU KV cache size: 16,384 tokens",
        "Maximum concurrency for 4,096 tokens per request: 4.00x",
        "Available KV cache memory: 2.00 GiB", "KV cache size: 16,384 tokens",
        "Maximum concurrency for 4,096 tokens per request: 4.00x",
        "The KV cache's memory becomes resident as its blocks are first used: the engine "
        "process grows by up to 2.00 GiB under load and keeps it (the blocks hold the prefix "
        "cache)"]


def test_default_cpu_kv_cache_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 0 < mem.available_host_memory()
    monkeypatch.setattr(mem, "available_host_memory", lambda: 64 * GiB)
    assert mem.default_cpu_kv_cache_bytes() == 4 * GiB
    monkeypatch.setattr(mem, "available_host_memory", lambda: 8 * GiB)
    assert mem.default_cpu_kv_cache_bytes() == 2 * GiB
