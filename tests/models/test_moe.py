"""Mixtral and Qwen3-MoE as transformers runs them: tiny random checkpoints of mixtral-8x7b's and
qwen3-30b-a3b's shapes (8 experts, top-2; Qwen3-MoE with a dense layer between sparse ones),
saved by transformers in the original per-expert layout and in transformers 5's grouped one,
give transformers' greedy tokens with the default schedule and in 16-token chunks.

Routing is shown to matter (top-1, or Qwen3-MoE's norm_topk_prob flipped, changes
transformers' tokens), one sparse block equals transformers' bit for bit in bfloat16 (the
rounding of each family's weights), and the planner counts every expert's weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedllm import LLM
from pagedllm.entrypoints import cli
from pagedllm.entrypoints.plan import main as plan_main
from pagedllm.models.arch import ModelArch
from pagedllm.models.moe import MoeForCausalLM, SparseMoeBlock
from pagedllm.worker.memory import count_parameters, parameter_breakdown
from tests.models.conftest import (
    CHUNKED,
    hf_greedy,
    pagedllm_greedy,
    random_prompts,
    randomize,
    save_checkpoint,
)

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
VOCAB = 256
PROMPT_LENGTHS = (20, 37)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
# the real configs with the widths shrunk
CONFIGS_BY_FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": dict(_COMMON, architectures=["MixtralForCausalLM"], num_hidden_layers=2,
                    intermediate_size=48, num_local_experts=8, rms_norm_eps=1e-5,
                    rope_theta=1e6),
    "qwen3_moe": dict(_COMMON, architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=3,
                      head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      norm_topk_prob=True, mlp_only_layers=[1], rms_norm_eps=1e-6),
}
FAMILIES = list(CONFIGS_BY_FAMILY)


def _hf_classes(family: str) -> tuple[Any, Any]:
    import transformers

    prefix = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}[family]
    return (getattr(transformers, f"{prefix}Config"),
            getattr(transformers, f"{prefix}ForCausalLM"))


def _model(family: str, **overrides: Any) -> Any:
    config_class, model_class = _hf_classes(family)
    config = config_class(**{**CONFIGS_BY_FAMILY[family], **overrides},
                          attn_implementation="eager")
    return randomize(model_class(config), std=0.1, vector_std=0.1)


@dataclass(frozen=True)
class Checkpoint:
    folders: dict[str, str]  # layout ("original", "grouped") -> folder
    prompts: list[list[int]]
    expected: list[list[int]]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    model = _model(request.param)
    prompts = random_prompts(PROMPT_LENGTHS, VOCAB)
    expected = [hf_greedy(model, p) for p in prompts]
    original = tmp_path_factory.mktemp(request.param)
    save_checkpoint(model, original, VOCAB)
    grouped = tmp_path_factory.mktemp(f"{request.param}-grouped")
    model.save_pretrained(grouped, save_original_format=False)
    shutil.copy(original / "tokenizer.json", grouped)
    return Checkpoint({"original": str(original), "grouped": str(grouped)}, prompts, expected)


def _tensor_names(folder: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_checkpoint_layouts_are_the_ones_pagedllm_maps(checkpoint: Checkpoint) -> None:
    original, grouped = (_tensor_names(f) for f in checkpoint.folders.values())
    assert any(".experts.0." in n for n in original)
    assert not any(".experts.0." in n for n in grouped)
    assert "model.layers.0.mlp.experts.gate_up_proj" in grouped


@pytest.mark.parametrize("layout", ["original", "grouped"])
def test_greedy_matches_transformers(checkpoint: Checkpoint, layout: str) -> None:
    llm = LLM(checkpoint.folders[layout], dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    assert pagedllm_greedy(llm, checkpoint.prompts) == checkpoint.expected


def test_greedy_matches_transformers_in_chunks_of_16(checkpoint: Checkpoint) -> None:
    llm = LLM(checkpoint.folders["original"], dtype="float32", kv_cache_memory_bytes=8 * 2**20,
              **CHUNKED)
    assert pagedllm_greedy(llm, checkpoint.prompts) == checkpoint.expected


@pytest.mark.parametrize(("family", "change"), [
    ("mixtral", {"num_experts_per_tok": 1}),
    ("qwen3_moe", {"num_experts_per_tok": 1}),
    ("qwen3_moe", {"norm_topk_prob": False}),
])
def test_routing_changes_transformers_tokens(family: str, change: dict[str, Any]) -> None:
    """The same weights routed otherwise give other tokens: the tests above see routing."""
    prompts = random_prompts(PROMPT_LENGTHS, VOCAB)
    model, routed = _model(family), _model(family, **change)
    routed.load_state_dict(model.state_dict())
    assert [hf_greedy(routed, p) for p in prompts] != [hf_greedy(model, p) for p in prompts]


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_block_equals_transformers_in_bfloat16(family: str) -> None:
    """Bit for bit: float32 routing, Mixtral's float32 products vs Qwen3-MoE's rounded
    weights, and the sum over experts in transformers' order (top-4, so order shows)."""
    hf = _model(family, num_experts_per_tok=4).to(torch.bfloat16)
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    ours = MoeForCausalLM(arch).to(torch.bfloat16)
    ours.load_weights(hf.state_dict().items())
    x = torch.randn(1, 33, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        expected = hf.model.layers[0].mlp(x)[0]
        block = ours.model.layers[0].mlp
        assert isinstance(block, SparseMoeBlock)
        torch.testing.assert_close(block(x[0]), expected, rtol=0, atol=0)


def test_arch_reads_the_published_configs() -> None:
    mixtral = ModelArch.from_hf_config(json.loads((CONFIGS / "mixtral-8x7b/config.json")
                                                  .read_text()))
    assert mixtral.moe is not None and mixtral.sliding_windows == (0,) * 32
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.intermediate_size) == (
        8, 2, 14336)
    assert mixtral.moe.renormalize and not mixtral.moe.round_weights
    qwen = ModelArch.from_hf_config(json.loads((CONFIGS / "qwen3-30b-a3b/config.json")
                                               .read_text()))
    assert qwen.moe is not None and qwen.qk_norm
    assert (qwen.moe.num_experts, qwen.moe.top_k, qwen.moe.intermediate_size) == (128, 8, 768)
    assert qwen.moe.renormalize and qwen.moe.round_weights
    assert all(qwen.is_sparse(i) for i in range(48))


def test_qwen3_moe_dense_layers_and_norm_topk_prob_default() -> None:
    """Sparse: every decoder_sparse_step-th layer not in mlp_only_layers; norm_topk_prob
    defaults to false, as in transformers."""
    config = {**CONFIGS_BY_FAMILY["qwen3_moe"], "model_type": "qwen3_moe",
              "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    del config["norm_topk_prob"]
    arch = ModelArch.from_hf_config(config)
    assert [arch.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]
    assert arch.moe is not None and not arch.moe.renormalize


def test_missing_expert_is_an_error(checkpoint: Checkpoint) -> None:
    from pagedllm.models.loader.hf import iter_hf_weights

    arch = ModelArch.from_hf_config(json.loads(
        (Path(checkpoint.folders["original"]) / "config.json").read_text()))
    weights = [(n, t) for n, t in iter_hf_weights(checkpoint.folders["original"])
               if ".experts.3." not in n]
    with pytest.raises(ValueError, match="missing expert weights"):
        MoeForCausalLM(arch).load_weights(weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_planner_counts_transformers_parameters(family: str) -> None:
    model = _model(family)
    arch = ModelArch.from_hf_config(model.config.to_dict())
    assert count_parameters(arch) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "total"), [("mixtral-8x7b", 46_702_792_704),
                                             ("qwen3-30b-a3b", 30_532_122_624)])
def test_planner_counts_every_expert_of_the_real_models(name: str, total: int) -> None:
    """The published totals (46.7B, 30.5B), as transformers builds them (on the meta device)."""
    config = json.loads((CONFIGS / name / "config.json").read_text())
    config_class, model_class = _hf_classes(config["model_type"])
    with torch.device("meta"):
        hf = model_class(config_class(**config))
    arch = ModelArch.from_hf_config(config)
    assert count_parameters(arch) == sum(p.numel() for p in hf.parameters()) == total


def test_plan_mixtral_on_141_gib(capsys: pytest.CaptureFixture) -> None:
    """bfloat16 weights of all 8 experts of 32 layers: 2 x 46,702,792,704 bytes."""
    argv = ["plan", str(CONFIGS / "mixtral-8x7b"), "--gpu-memory-gib", "141", "--format", "json"]
    rc = plan_main(cli.build_parser(argv).parse_args(argv))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["errors"] == []
    assert report["parameters"]["total"] == 46_702_792_704
    assert report["weight_bytes"]["bfloat16"] == report["memory"]["weight_bytes"] == (
        93_405_585_408)
    arch = ModelArch.from_hf_config(json.loads((CONFIGS / "mixtral-8x7b/config.json")
                                               .read_text()))
    p = parameter_breakdown(arch)
    assert p.linear == 32 * (4096 * 6144 + 4096 * 4096 + 8 * 3 * 4096 * 14336)
    assert p.other == 32 * (2 * 4096 + 8 * 4096) + 4096  # norms and routers
