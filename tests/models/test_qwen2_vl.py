"""Qwen2-VL against transformers in float32 on a tiny random checkpoint: the config numbers, the
vision tower, the M-RoPE positions and the logits of whole prompts with 0, 1 and 2 images,
run through the paged KV cache as the model runner runs them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pagedllm.attention.backend import (
    AttentionMetadata,
    ForwardContext,
    forward_context,
    get_attention_backend,
)
from pagedllm.layers.rotary import MRotaryEmbedding, RotaryEmbedding
from pagedllm.models.arch import ModelArch, VisionArch
from pagedllm.models.loader import iter_weights, load_hf_config, resolve_model
from pagedllm.models.qwen2_vl import Qwen2VLForConditionalGeneration, mrope_positions
from pagedllm.models.registry import model_class
from pagedllm.multimodal.image_processor import ImageProcessorConfig

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 16
# (width, height) of the test images: grids of 4x4, 8x6 and 12x16 patches
SIZES = [(56, 56), (84, 112), (224, 168)]
PROMPT_IMAGES = {"text only": [], "one image": [1], "two images": [0, 2]}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def config(tiny_qwen2_vl_dir: str) -> dict:
    return load_hf_config(resolve_model(tiny_qwen2_vl_dir))


@pytest.fixture(scope="module")
def arch(config: dict) -> ModelArch:
    return ModelArch.from_hf_config(config)


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_vl_dir: str):
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_qwen2_vl_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl_dir: str, arch: ModelArch) -> Qwen2VLForConditionalGeneration:
    model = model_class(arch)(arch)
    model.load_weights(iter_weights(resolve_model(tiny_qwen2_vl_dir)))
    return model.eval()


@pytest.fixture(scope="module")
def image_processor(tiny_qwen2_vl_dir: str):
    return transformers.Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_vl_dir)


def _pixels(image_processor, which: list[int]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Pixel values [num_patches, 1176] and grids of random images of the given SIZES."""
    from PIL import Image

    if not which:
        return torch.empty(0, 3 * 2 * 14 * 14), []
    rng = np.random.default_rng(sum(which) + 7)
    images = [Image.fromarray(rng.integers(0, 256, (SIZES[i][1], SIZES[i][0], 3), np.uint8))
              for i in which]
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], [tuple(g) for g in out["image_grid_thw"].tolist()]


def _prompt(config: dict, grids: list[tuple[int, int, int]]) -> list[int]:
    """Random text around each image's <|vision_start|> <|image_pad|>*n <|vision_end|>."""
    rng = np.random.default_rng(len(grids))

    def text(n: int) -> list[int]:
        return rng.integers(3, 49152, n).tolist()

    ids = [1, *text(5)]
    for t, h, w in grids:
        ids += [config["vision_start_token_id"], *[config["image_token_id"]] * (t * h * w // 4),
                config["vision_end_token_id"], *text(4)]
    return ids + text(3)


def _hf_rope_index(hf_model, arch: ModelArch, ids: list[int],
                   grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    input_ids = torch.tensor([ids])
    positions, delta = hf_model.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == arch.image_token_id).int(),
        image_grid_thw=torch.tensor(grids) if grids else None)
    return positions[:, 0], int(delta)


def _hf_logits(hf_model, arch: ModelArch, ids: list[int], pixels: torch.Tensor,
               grids: list[tuple[int, int, int]]) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    kwargs = dict(pixel_values=pixels, image_grid_thw=torch.tensor(grids)) if grids else {}
    with torch.no_grad():
        out = hf_model(input_ids=input_ids,
                       mm_token_type_ids=(input_ids == arch.image_token_id).int(), **kwargs)
    return out.logits[0]


class PagedPrompt:
    """One request's KV cache and the step metadata the model runner would build for it."""

    def __init__(self, arch: ModelArch, max_len: int) -> None:
        self.blocks = list(range(1, -(-max_len // BLOCK_SIZE) + 1))  # block 0 pads tables
        shape = (2, len(self.blocks) + 1, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [torch.zeros(shape) for _ in range(arch.num_layers)]
        self.backend = get_attention_backend("torch")
        self.num_cached = 0

    def run(self, model: Qwen2VLForConditionalGeneration, ids: list[int], positions: np.ndarray,
            image_embeds: torch.Tensor | None = None,
            image_token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the next len(ids) tokens of the request, after those already cached."""
        seq_len = self.num_cached + len(ids)
        slots = [self.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                 for p in range(self.num_cached, seq_len)]
        metadata = AttentionMetadata(
            num_tokens=len(ids), slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32),
            block_tables=torch.tensor([self.blocks], dtype=torch.int32),
            max_query_len=len(ids), max_seq_len=seq_len, query_lens_cpu=[len(ids)],
            seq_lens_cpu=[seq_len])
        self.backend.prepare(metadata, BLOCK_SIZE)
        with torch.no_grad(), forward_context(
                ForwardContext(metadata, self.kv_caches, self.backend)):
            hidden = model(torch.tensor(ids), torch.from_numpy(positions), image_embeds,
                           image_token_index)
        self.num_cached = seq_len
        return model.compute_logits(hidden)


def test_arch_from_tiny_config(arch: ModelArch) -> None:
    assert arch.architecture == "Qwen2VLForConditionalGeneration"
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (64, 2, 4, 2)
    assert arch.head_dim == 16 and arch.qkv_bias and not arch.tie_word_embeddings
    assert arch.mrope_section == (2, 3, 3) and arch.rope_theta == 1e6
    assert (arch.image_token_id, arch.vision_start_token_id) == (49154, 49152)
    assert arch.vision == VisionArch(
        depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu", out_hidden_size=64,
        rope_theta=10000.0)
    # The patch embedding takes rows as wide as the image processor makes them.
    patch = Qwen2VLForConditionalGeneration(arch).visual.patch_embed.proj.weight
    assert patch[0].numel() == ImageProcessorConfig().patch_dim == 3 * 2 * 14 * 14


def test_arch_from_qwen2_vl_7b_config() -> None:
    """The real checkpoint's config: transformers 4 layout, text numbers at the top level."""
    path = os.path.join(REPO, "benchmarks", "configs", "qwen2-vl-7b-instruct", "config.json")
    with open(path) as f:
        arch = ModelArch.from_hf_config(json.load(f))
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (
        3584, 28, 28, 4)
    assert arch.head_dim == 128 and arch.vocab_size == 152064 and arch.rope_theta == 1e6
    assert arch.mrope_section == (16, 24, 24)
    assert (arch.image_token_id, arch.vision_start_token_id) == (151655, 151652)
    assert arch.vision == VisionArch(
        depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, patch_size=14,
        temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu",
        out_hidden_size=3584, rope_theta=10000.0)


def test_text_models_have_no_vision(default_source) -> None:
    arch = ModelArch.from_hf_config(load_hf_config(default_source))
    assert arch.vision is None and arch.mrope_section is None and arch.image_token_id is None


def test_mrope_with_equal_rows_is_plain_rope() -> None:
    plain = RotaryEmbedding(16, 64, 1e6)
    mrope = MRotaryEmbedding(16, 64, 1e6, (2, 3, 3))
    positions = torch.tensor([0, 5, 17, 63])
    for got, expected in zip(mrope(positions.expand(3, -1), torch.float32),
                             plain(positions, torch.float32)):
        assert got.shape == (4, 1, 16)
        assert torch.equal(got, expected)


def test_encode_images_matches_transformers(model, hf_model, image_processor) -> None:
    pixels, grids = _pixels(image_processor, [0, 1, 2])
    with torch.no_grad():
        expected = hf_model.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        got = model.encode_images(pixels, grids)
    assert [g.shape for g in got] == [(t * h * w // 4, 64) for t, h, w in grids]
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", PROMPT_IMAGES.values(), ids=PROMPT_IMAGES.keys())
def test_mrope_positions_match_transformers(config, arch, hf_model, image_processor,
                                            which) -> None:
    _, grids = _pixels(image_processor, which)
    ids = _prompt(config, grids)
    positions, delta = mrope_positions(ids, grids, arch)
    expected, expected_delta = _hf_rope_index(hf_model, arch, ids, grids)
    assert positions.dtype == np.int64 and positions.shape == (3, len(ids))
    np.testing.assert_array_equal(positions, expected.numpy())
    assert delta == expected_delta
    if not grids:  # plain RoPE: three equal rows 0..T-1
        assert delta == 0 and positions[0, -1] == len(ids) - 1
    else:  # images use fewer positions than tokens
        assert delta < 0


def test_mrope_positions_refuse_missing_placeholders(config, arch) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        mrope_positions(_prompt(config, []), [(1, 4, 4)], arch)


@pytest.mark.parametrize("which", PROMPT_IMAGES.values(), ids=PROMPT_IMAGES.keys())
def test_prefill_and_decode_logits_match_transformers(config, arch, model, hf_model,
                                                      image_processor, which) -> None:
    pixels, grids = _pixels(image_processor, which)
    ids = _prompt(config, grids)
    expected = _hf_logits(hf_model, arch, ids + [42], pixels, grids)  # [T + 1, vocab]
    with torch.no_grad():
        embeds = torch.cat(model.encode_images(pixels, grids)) if grids else None
    positions, delta = mrope_positions(ids, grids, arch)
    paged = PagedPrompt(arch, len(ids) + 1)
    prefill = paged.run(model, ids, positions, embeds)
    assert prefill.dtype == torch.float32
    torch.testing.assert_close(prefill, expected[:-1], rtol=0, atol=1e-4)
    # A generated token at sequence index p sits at p + delta in all three rows.
    decode = paged.run(model, [42], np.full((3, 1), len(ids) + delta, dtype=np.int64))
    torch.testing.assert_close(decode, expected[-1:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", [3, 12, 17])
def test_prefill_chunks_through_an_image(config, arch, model, hf_model, image_processor,
                                         split: int) -> None:
    """The runner's chunked prefill: each chunk gets the embedding rows of the image tokens it
    holds, placed by their index in the chunk (a chunk may hold part of an image)."""
    pixels, grids = _pixels(image_processor, [1])  # its 12 image tokens are ids[7:19]
    ids = _prompt(config, grids)
    expected = _hf_logits(hf_model, arch, ids, pixels, grids)
    with torch.no_grad():
        embeds = torch.cat(model.encode_images(pixels, grids))
    positions, _ = mrope_positions(ids, grids, arch)
    image_rows = np.flatnonzero(np.array(ids) == arch.image_token_id)
    paged = PagedPrompt(arch, len(ids))
    logits = []
    for lo, hi in ((0, split), (split, len(ids))):
        inside = (image_rows >= lo) & (image_rows < hi)
        index = torch.from_numpy(image_rows[inside] - lo)
        logits.append(paged.run(model, ids[lo:hi], positions[:, lo:hi], embeds[inside], index))
    torch.testing.assert_close(torch.cat(logits), expected, rtol=0, atol=1e-4)


def test_loads_transformers_5_in_memory_names(arch, model, hf_model) -> None:
    state = hf_model.state_dict()
    assert any(n.startswith("model.visual.") for n in state)
    assert any(n.startswith("model.language_model.") for n in state)
    other = Qwen2VLForConditionalGeneration(arch)
    other.load_weights(state.items())
    for (name, got), (_, expected) in zip(other.named_parameters(), model.named_parameters()):
        assert torch.equal(got, expected), name


def test_missing_or_unknown_weights_raise(arch, tiny_qwen2_vl_dir) -> None:
    weights = list(iter_weights(resolve_model(tiny_qwen2_vl_dir)))
    for dropped in ("visual.blocks.1.attn.qkv.bias", "model.layers.1.mlp.down_proj.weight",
                    "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        with pytest.raises(ValueError, match="missing"):
            Qwen2VLForConditionalGeneration(arch).load_weights(
                (n, t) for n, t in weights if n != dropped)
    with pytest.raises(ValueError, match="no parameter"):
        Qwen2VLForConditionalGeneration(arch).load_weights(
            [*weights, ("visual.blocks.9.norm1.weight", torch.ones(32))])
