"""Qwen2-VL image token counts, checked against transformers' preprocessor."""

from __future__ import annotations

import random

import pytest

from pagedllm.multimodal.image_processor import ImageProcessorConfig
from pagedllm.multimodal.image_tokens import (
    MAX_PIXELS,
    MIN_PIXELS,
    image_grid,
    image_token_count,
    parse_image_size,
    smart_resize,
)


def hf_smart_resize():
    pytest.importorskip("transformers")
    try:  # transformers 5: the PIL processor's module needs no torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as f
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as f
    return f


@pytest.mark.parametrize("width, height, tokens", [
    (224, 224, 64), (448, 448, 256), (1280, 720, 1196), (720, 1280, 1196), (28, 28, 4),
    (1, 1, 4),  # scaled up to min_pixels (56 x 56)
    (4000, 3000, 1230),  # scaled down under max_pixels: 1148 x 840 -> 41 x 30 tokens
])
def test_known_counts(width: int, height: int, tokens: int) -> None:
    assert image_token_count(width, height) == tokens


def test_1280x720_resizes_to_multiples_of_28() -> None:
    grid = image_grid(1280, 720)
    assert (grid.resized_width, grid.resized_height) == (1288, 728)
    assert (grid.grid_w, grid.grid_h, grid.num_patches, grid.num_tokens) == (92, 52, 4784, 1196)


def test_smart_resize_matches_transformers_on_many_sizes() -> None:
    reference = hf_smart_resize()
    rng = random.Random(0)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(2000)]
    sizes += [(h, w) for h in range(1, 200, 7) for w in range(1, 200, 11)]
    sizes += [(14 * k, 14 * k) for k in range(1, 200)]  # exact halves: round-half-to-even
    bounds = [(MIN_PIXELS, MAX_PIXELS), (256 * 28 * 28, 1280 * 28 * 28), (3136, 12845056)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in bounds:
            assert smart_resize(h, w, 28, lo, hi) == reference(h, w, 28, lo, hi), (h, w, lo, hi)


def test_extreme_aspect_ratio_is_refused_like_transformers() -> None:
    reference = hf_smart_resize()
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference(10, 2500)


def test_grid_matches_the_image_processor() -> None:
    transformers = pytest.importorskip("transformers")
    image_mod = pytest.importorskip("PIL.Image")
    try:
        processor = transformers.Qwen2VLImageProcessor()
    except ImportError as err:  # a processor backend that needs torchvision
        pytest.skip(str(err))
    for width, height in [(1280, 720), (224, 224), (333, 777), (1920, 1080), (60, 30)]:
        image = image_mod.new("RGB", (width, height))
        t, gh, gw = processor(images=[image])["image_grid_thw"][0].tolist()
        grid = image_grid(width, height)
        assert (t, gh, gw) == (1, grid.grid_h, grid.grid_w)
        assert gh * gw // 4 == image_token_count(width, height)


def test_plan_and_engine_read_the_same_preprocessor_limits() -> None:
    assert ImageProcessorConfig.from_dict({}) == ImageProcessorConfig()
    big = ImageProcessorConfig.from_dict({"min_pixels": 3136, "max_pixels": 12845056})
    assert big.grid(4000, 3000).num_tokens > image_token_count(4000, 3000)
    small = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 3136,
                                                     "longest_edge": 256 * 28 * 28}})
    assert small.grid(1280, 720).num_tokens <= 256


def test_parse_image_size() -> None:
    assert parse_image_size("1280x720") == (1280, 720)
    assert parse_image_size("64X48") == (64, 48)
    for bad in ("1280", "axb", "0x10", "1x2x3"):
        with pytest.raises(ValueError):
            parse_image_size(bad)
