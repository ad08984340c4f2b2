"""How many tokens an image costs in Qwen2-VL: the resize rule and the merged-patch count.

Qwen2-VL resizes each image so both sides are multiples of ``patch_size * merge_size`` (28) and
its area lies in ``[min_pixels, max_pixels]``, cuts it into 14x14 patches and merges every 2x2
patches into one language-model token. So a 224x224 image costs (224/28)^2 = 64 tokens and
448x448 costs 256. The prompt also holds ``<|vision_start|>`` and ``<|vision_end|>`` around the
image's ``<|image_pad|>`` tokens (``VISION_WRAPPER_TOKENS``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PATCH_SIZE = 14
MERGE_SIZE = 2
MIN_PIXELS = 56 * 56  # the HF preprocessor's defaults
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
VISION_WRAPPER_TOKENS = 2  # <|vision_start|> ... <|vision_end|>


def smart_resize(height: int, width: int, factor: int = PATCH_SIZE * MERGE_SIZE,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after Qwen2-VL's resize: each side rounded to a multiple of ``factor``,
    then both scaled down (floor) or up (ceil) by one factor when the area leaves
    ``[min_pixels, max_pixels]``, keeping the aspect ratio as closely as possible.

    Raises ValueError for an aspect ratio above 200 (as the HF preprocessor does).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    # round() is Python's (half to even), exactly as the reference preprocessor rounds.
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


@dataclass(frozen=True)
class ImageGrid:
    """One image after resizing: its pixel size, its patch grid and its merged token count."""

    resized_width: int
    resized_height: int
    grid_w: int  # patches across (resized_width / patch_size)
    grid_h: int
    merge_size: int

    @property
    def num_patches(self) -> int:
        """Rows of the vision encoder's input (before the 2x2 merge)."""
        return self.grid_h * self.grid_w

    @property
    def num_tokens(self) -> int:
        """``<|image_pad|>`` tokens in the prompt (after the 2x2 merge)."""
        return self.num_patches // (self.merge_size ** 2)


def image_grid(width: int, height: int, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS, patch_size: int = PATCH_SIZE,
               merge_size: int = MERGE_SIZE) -> ImageGrid:
    """The grid of a ``width x height`` image (note: width first, as in "1280x720")."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return ImageGrid(w, h, w // patch_size, h // patch_size, merge_size)


def image_token_count(width: int, height: int, min_pixels: int = MIN_PIXELS,
                      max_pixels: int = MAX_PIXELS) -> int:
    """Merged image tokens of a ``width x height`` image: (h / 28) * (w / 28) after resizing."""
    return image_grid(width, height, min_pixels, max_pixels).num_tokens


def pixel_limits(preprocessor: Mapping[str, Any],
                 default: tuple[int, int] = (MIN_PIXELS, MAX_PIXELS)) -> tuple[Any, Any]:
    """(min_pixels, max_pixels) as a ``preprocessor_config.json`` (or per-server overrides) sets
    them: older files write ``min_pixels`` / ``max_pixels``, newer ones
    ``size: {shortest_edge, longest_edge}``; the explicit keys win, as in transformers.
    Values are returned unchecked so that callers can name a bad one."""
    size = preprocessor.get("size") or {}
    lo = preprocessor.get("min_pixels", size.get("shortest_edge"))
    hi = preprocessor.get("max_pixels", size.get("longest_edge"))
    return (default[0] if lo is None else lo, default[1] if hi is None else hi)


def parse_image_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> (1280, 720): width, then height."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"image size must look like WIDTHxHEIGHT (e.g. 1280x720), got {text!r}")
    width, height = (int(p) for p in parts)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {text!r}")
    return width, height
