"""Qwen2.5-VL against transformers in float32 on a tiny random checkpoint whose windows leave
partial ones at the images' edges: the config numbers, the window order, the vision tower, the
parameter count, and greedy tokens through the engine with 0, 1 and 2 images, chunked or not."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM
from pagedllm.models.arch import ModelArch, VisionArch
from pagedllm.models.loader import iter_weights, load_hf_config, resolve_model
from pagedllm.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, window_order
from pagedllm.models.registry import model_class
from pagedllm.worker import memory as mem
from tests.conftest import IMAGE_PAD_ID
from tests.engine.test_vision_language import (
    GREEDY,
    IMAGE,
    MAX_TOKENS,
    chat_prompt,
    random_image,
)

transformers = pytest.importorskip("transformers")

# (prompt, images): 0, 1 and 2 images; merged grids (rows x columns) 5x7, 4x5 and 9x5, cut
# into windows of 3x3 merged patches with partial ones at the bottom and right.
CASES = [
    (chat_prompt("Tell me a story about the sea."), []),
    (chat_prompt(f"{IMAGE}What is in this picture?"), [random_image(196, 140, 1)]),
    (chat_prompt(f"Compare {IMAGE} with {IMAGE} please."),
     [random_image(140, 112, 2), random_image(150, 260, 3)]),
]


@pytest.fixture(scope="module")
def arch(tiny_qwen2_5_vl_dir: str) -> ModelArch:
    return ModelArch.from_hf_config(load_hf_config(resolve_model(tiny_qwen2_5_vl_dir)))


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_5_vl_dir: str):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_qwen2_5_vl_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tiny_qwen2_5_vl_dir: str, arch: ModelArch) -> Qwen2_5_VLForConditionalGeneration:
    model = model_class(arch)(arch)
    model.load_weights(iter_weights(resolve_model(tiny_qwen2_5_vl_dir)))
    return model.eval()


@pytest.fixture(scope="module")
def hf_images(tiny_qwen2_5_vl_dir: str):
    """transformers' image processor for the folder (Qwen2.5-VL uses Qwen2-VL's)."""
    return transformers.Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_5_vl_dir)


def test_arch_from_tiny_config(arch: ModelArch) -> None:
    assert arch.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert (arch.hidden_size, arch.num_layers, arch.mrope_section) == (64, 2, (2, 3, 3))
    assert arch.vision == VisionArch(
        depth=4, embed_dim=32, num_heads=4, mlp_ratio=1.5, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, in_channels=3, hidden_act="silu", out_hidden_size=64,
        rope_theta=10000.0, family="qwen2_5_vl", intermediate_size=48, window_size=84,
        fullatt_block_indexes=(1, 3))


@pytest.mark.parametrize("grids", [[(1, 10, 14)], [(1, 12, 12), (2, 18, 10), (1, 2, 2)]])
def test_window_order_matches_transformers(grids: list[tuple[int, int, int]]) -> None:
    from transformers.vision_utils import get_vision_window_index

    expected, cu_lens = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2,
                                                window_size=84, patch_size=14)
    order, lens = window_order(grids, merge=2, side=3)
    assert torch.equal(order, expected)
    assert [0, *torch.tensor(lens).cumsum(0).tolist()] == cu_lens.tolist()


def test_encode_images_matches_transformers(model, hf_model, hf_images) -> None:
    images = [image for _, case in CASES for image in case]
    out = hf_images(images=images, return_tensors="pt")
    pixels, grids = out["pixel_values"], [tuple(g) for g in out["image_grid_thw"].tolist()]
    with torch.no_grad():
        expected = hf_model.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        got = model.encode_images(pixels, grids)
    assert [g.shape[0] for g in got] == [35, 20, 45]
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-5)


def test_loads_transformers_5_in_memory_names(arch, model, hf_model) -> None:
    state = hf_model.state_dict()
    assert any(n.startswith("model.visual.blocks.0.mlp.gate_proj") for n in state)
    other = Qwen2_5_VLForConditionalGeneration(arch)
    other.load_weights(state.items())
    for (name, got), (_, expected) in zip(other.named_parameters(), model.named_parameters()):
        assert torch.equal(got, expected), name


def _hf_numel(config) -> int:
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


@pytest.mark.parametrize("size", ["tiny", "transformers default"])
def test_parameter_count_matches_transformers(tiny_qwen2_5_vl_dir: str, size: str) -> None:
    if size == "tiny":
        config = transformers.AutoConfig.from_pretrained(tiny_qwen2_5_vl_dir)
    else:  # a 72B-shaped text model with the 7B/72B vision tower
        config = transformers.Qwen2_5_VLConfig()
    raw = config.to_dict()
    raw["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    ours = (mem.count_parameters(ModelArch.from_hf_config(raw))
            + mem.count_vision_parameters(raw["vision_config"]))
    assert ours == _hf_numel(config)


@pytest.fixture(scope="module")
def expected(tiny_qwen2_5_vl_dir: str, hf_model, hf_images) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy output) per case, by transformers (see test_vision_language.py)."""
    hf_model.generation_config.eos_token_id = None  # like ignore_eos
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_5_vl_dir)
    out = []
    for text, images in CASES:
        kwargs = {}
        if images:
            kwargs = dict(hf_images(images=images, return_tensors="pt"))
            for t, h, w in kwargs["image_grid_thw"].tolist():
                text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
            text = text.replace("<|placeholder|>", "<|image_pad|>")
        ids = tokenizer(text, return_tensors="pt")
        if images:
            kwargs["mm_token_type_ids"] = (ids["input_ids"] == IMAGE_PAD_ID).int()
        with torch.no_grad():
            generated = hf_model.generate(**ids, **kwargs, max_new_tokens=MAX_TOKENS,
                                          do_sample=False)
        prompt = ids["input_ids"][0].tolist()
        out.append((prompt, generated[0, len(prompt):].tolist()))
    return out


@pytest.mark.parametrize("settings", [{}, {"max_num_batched_tokens": 16, "max_num_seqs": 4}],
                         ids=["default", "16-token chunks"])
def test_greedy_tokens_match_transformers(tiny_qwen2_5_vl_dir, expected, settings) -> None:
    llm = LLM(tiny_qwen2_5_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024,
              **settings)
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}}
                            for text, images in CASES], GREEDY, use_tqdm=False)
    for (want_prompt, want), out in zip(expected, outputs):
        assert out.prompt_token_ids == want_prompt
        assert out.outputs[0].token_ids == want
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"
