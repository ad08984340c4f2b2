"""Qwen2-VL image preprocessing, checked against transformers' Qwen2VLImageProcessorPil."""

from __future__ import annotations

import io
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pagedllm.multimodal.image_processor import (
    ImageProcessorConfig,
    ProcessedImage,
    process_image,
)

QWEN2_VL_FILE = {  # Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def hf_processor(**kwargs: Any) -> Any:
    pytest.importorskip("transformers")
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
    except ImportError as err:
        pytest.skip(f"transformers has no Qwen2VLImageProcessorPil: {err}")
    return Qwen2VLImageProcessorPil(**kwargs)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise plus a gradient: resampling differences show on both."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width).astype(np.uint16)[None, :, None]
    noise = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels = ((noise + ramp) // 2).astype(np.uint8)
    rgba = Image.fromarray(pixels, "RGBA")
    if mode == "RGBA":
        return rgba
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    if mode == "P+transparency":
        palette = rgba.convert("RGB").quantize(16)
        palette.info["transparency"] = 3
        return palette
    return rgba.convert(mode)


def assert_matches_hf(image: Image.Image, config: ImageProcessorConfig,
                      reference: Any) -> ProcessedImage:
    out = process_image(image, config)
    expected = reference(images=[image], return_tensors="np")
    grid = tuple(int(x) for x in expected["image_grid_thw"][0])
    assert out.grid_thw == grid
    assert out.num_tokens == grid[0] * grid[1] * grid[2] // config.merge_size ** 2
    assert out.pixel_values.dtype == torch.float32
    assert tuple(out.pixel_values.shape) == expected["pixel_values"].shape
    assert out.pixel_values.shape[1] == config.patch_dim == 1176
    np.testing.assert_allclose(out.pixel_values.numpy(), expected["pixel_values"], atol=1e-5,
                               rtol=0)
    return out


@pytest.mark.parametrize("width, height", [
    (20, 30),  # below min_pixels: scaled up
    (1, 1), (224, 224), (448, 448), (333, 517), (517, 333), (1280, 720), (57, 1001),
    (4000, 3000),  # beyond max_pixels: scaled down
    (5000, 28),  # aspect ratio near the 200 limit
])
def test_pixel_values_match_transformers(width: int, height: int) -> None:
    assert_matches_hf(random_image(width, height), ImageProcessorConfig(), hf_processor())


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK"])
def test_non_rgb_modes_match_transformers(mode: str) -> None:
    image = random_image(301, 187, mode, seed=1)
    out = assert_matches_hf(image, ImageProcessorConfig(), hf_processor())
    assert out.grid_thw == (1, 14, 22)


def test_known_token_counts() -> None:
    config = ImageProcessorConfig()
    assert process_image(random_image(224, 224), config).num_tokens == 64
    assert process_image(random_image(448, 448), config).grid_thw == (1, 32, 32)
    assert process_image(random_image(448, 448), config).num_tokens == 256


@pytest.mark.parametrize("min_pixels, max_pixels", [
    (256 * 28 * 28, 1280 * 28 * 28), (3136, 12845056), (100, 200_000), (28 * 28, 28 * 28),
])
def test_overridden_pixel_limits_match_transformers(min_pixels: int, max_pixels: int) -> None:
    config = ImageProcessorConfig.from_model_dir(
        None, {"min_pixels": min_pixels, "max_pixels": max_pixels})
    assert (config.min_pixels, config.max_pixels) == (min_pixels, max_pixels)
    reference = hf_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    for width, height in [(20, 30), (333, 517), (1500, 1100)]:
        assert_matches_hf(random_image(width, height, seed=width), config, reference)


def test_rows_are_in_merge_window_order() -> None:
    """Each 2x2 window of patches is 4 consecutive rows: what the patch merger expects."""
    # 56x56 image: a 4x4 patch grid, 2x2 windows; paint each patch with its own grey level.
    patch_ids = np.arange(16).reshape(4, 4)
    pixels = np.kron(patch_ids * 16, np.ones((14, 14))).astype(np.uint8)
    image = Image.fromarray(np.stack([pixels] * 3, axis=-1), "RGB")
    out = process_image(image, ImageProcessorConfig())
    assert out.grid_thw == (1, 4, 4)
    levels = out.pixel_values[:, 0].numpy()  # first value of each row: red channel, frame 0
    order = [int(np.argmin(np.abs(np.unique(levels) - v))) for v in levels]
    assert order == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    # the frame is repeated over the temporal axis: both halves of each channel block agree
    row = out.pixel_values[0].reshape(3, 2, 14 * 14)
    assert bool((row[:, 0] == row[:, 1]).all())


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        process_image(Image.new("RGB", (2010, 10)), ImageProcessorConfig())


def test_content_hash_follows_pixels_not_encoding() -> None:
    image = random_image(123, 77)

    def reencoded(fmt: str) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return Image.open(io.BytesIO(buffer.getvalue()))

    config = ImageProcessorConfig()
    png, bmp = process_image(reencoded("PNG"), config), process_image(reencoded("BMP"), config)
    assert png.content_hash == bmp.content_hash == process_image(image, config).content_hash
    assert len(png.content_hash) == 64
    changed = image.copy()
    changed.putpixel((5, 5), (0, 0, 0))
    assert process_image(changed, config).content_hash != png.content_hash
    # same bytes, other shape: a different picture
    flipped = Image.frombytes("RGB", (77, 123), image.tobytes())
    assert process_image(flipped, config).content_hash != png.content_hash


@pytest.fixture
def model_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmm_") as folder:
        yield Path(folder)


def write_preprocessor(folder: Path, content: dict[str, Any]) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(content))


def test_config_defaults_without_a_file(model_dir: Path) -> None:
    assert ImageProcessorConfig.from_model_dir(None) == ImageProcessorConfig()
    assert ImageProcessorConfig.from_model_dir(str(model_dir)) == ImageProcessorConfig()
    config = ImageProcessorConfig()
    assert (config.min_pixels, config.max_pixels) == (56 * 56, 28 * 28 * 1280)
    assert config.image_mean == (0.48145466, 0.4578275, 0.40821073)


def test_config_reads_min_max_pixels_spelling(model_dir: Path) -> None:
    write_preprocessor(model_dir, QWEN2_VL_FILE)
    config = ImageProcessorConfig.from_model_dir(str(model_dir))
    assert (config.min_pixels, config.max_pixels) == (3136, 12845056)
    assert (config.patch_size, config.temporal_patch_size, config.merge_size) == (14, 2, 2)
    reference = hf_processor()
    loaded = type(reference).from_pretrained(str(model_dir))
    assert_matches_hf(random_image(2000, 1500), config, loaded)


def test_config_reads_size_spelling(model_dir: Path) -> None:
    content = {k: v for k, v in QWEN2_VL_FILE.items() if not k.endswith("_pixels")}
    content["size"] = {"shortest_edge": 200 * 28 * 28, "longest_edge": 300 * 28 * 28}
    write_preprocessor(model_dir, content)
    config = ImageProcessorConfig.from_model_dir(str(model_dir))
    assert (config.min_pixels, config.max_pixels) == (200 * 28 * 28, 300 * 28 * 28)
    loaded = type(hf_processor()).from_pretrained(str(model_dir))
    for width, height in [(100, 100), (1000, 1000)]:
        assert_matches_hf(random_image(width, height), config, loaded)


def test_explicit_keys_win_over_size_and_overrides_win_over_the_file(model_dir: Path) -> None:
    write_preprocessor(model_dir, {"size": {"shortest_edge": 1000, "longest_edge": 2_000_000},
                                   "max_pixels": 1_000_000})
    config = ImageProcessorConfig.from_model_dir(str(model_dir))
    assert (config.min_pixels, config.max_pixels) == (1000, 1_000_000)
    config = ImageProcessorConfig.from_model_dir(str(model_dir), {"max_pixels": 500_000})
    assert (config.min_pixels, config.max_pixels) == (1000, 500_000)
    config = ImageProcessorConfig.from_model_dir(
        str(model_dir), {"size": {"shortest_edge": 5000, "longest_edge": 60_000}})
    assert (config.min_pixels, config.max_pixels) == (5000, 60_000)


def test_unsupported_file_settings_are_logged(model_dir: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    write_preprocessor(model_dir, {**QWEN2_VL_FILE, "do_normalize": False, "resample": 3})
    ImageProcessorConfig.from_model_dir(str(model_dir))
    assert "do_normalize=False" in caplog.text
    assert "resample" not in caplog.text


@pytest.mark.parametrize("overrides, name", [
    ({"max_pixel": 100}, "max_pixel"),
    ({"patch_size": 16}, "patch_size"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels"),
    ({"min_pixels": 0}, "min_pixels"),
    ({"max_pixels": -1}, "max_pixels"),
    ({"max_pixels": "lots"}, "max_pixels"),
    ({"max_pixels": 1.5e6}, "max_pixels"),
    ({"min_pixels": True}, "min_pixels"),
    ({"size": 1000}, "size"),
    ({"size": {"height": 1000}}, "size"),
])
def test_bad_overrides_are_refused_by_name(overrides: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ImageProcessorConfig.from_model_dir(None, overrides)


def test_bad_file_values_are_refused(model_dir: Path) -> None:
    write_preprocessor(model_dir, {"min_pixels": 10_000, "max_pixels": 100})
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessorConfig.from_model_dir(str(model_dir))
    write_preprocessor(model_dir, {"image_std": [0.2, 0.0, 0.3]})
    with pytest.raises(ValueError, match="image_std"):
        ImageProcessorConfig.from_model_dir(str(model_dir))
    (model_dir / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_model_dir(str(model_dir))


LIMITS = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (100, 200_000), (3136, 50 * 28 * 28),
          (256 * 28 * 28, 256 * 28 * 28 + 500), (1003520, 1003520), (1, 500)]


@pytest.mark.parametrize("min_pixels, max_pixels", LIMITS)
def test_max_image_size_is_kept_as_is_and_fills_max_pixels(min_pixels: int,
                                                           max_pixels: int) -> None:
    config = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    width, height = config.max_image_size()
    grid = config.grid(width, height)
    assert (grid.resized_width, grid.resized_height) == (width, height)
    assert grid.num_tokens == max(1, max_pixels // 28 ** 2)
    assert width >= height and width / height <= 200


@pytest.mark.parametrize("min_pixels, max_pixels", LIMITS)
def test_max_image_tokens_is_the_most_any_image_costs(min_pixels: int, max_pixels: int) -> None:
    config = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    sizes = [(w, h) for h in range(1, 21) for w in range(h, 200 * h + 1)]  # thin and tiny
    rng = random.Random(0)
    sizes += [(rng.randint(1, 8000), rng.randint(1, 8000)) for _ in range(3000)]
    sizes.append(config.max_image_size())
    costs = [config.grid(w, h).num_tokens for w, h in sizes if max(w, h) / min(w, h) <= 200]
    assert max(costs) == config.max_image_tokens()  # a bound, and a tight one


def test_max_image_of_shipped_configs() -> None:
    config = ImageProcessorConfig()
    assert config.max_image_size() == (1120, 896)
    assert config.max_image_tokens() == 1280
    qwen2_vl = ImageProcessorConfig(min_pixels=3136, max_pixels=12845056)
    assert qwen2_vl.max_image_size() == (3584, 3584)
    assert qwen2_vl.max_image_tokens() == 16384
