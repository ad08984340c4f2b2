"""Qwen2-VL image preprocessing: PIL image -> normalized, flattened patches for the vision tower.

Numerically equal to transformers' ``Qwen2VLImageProcessorPil`` (its test is the oracle), so that
pagedllm's vision tower sees exactly what the model was trained on, without importing
transformers at serve time. The steps: composite transparency onto white, resize (PIL bicubic on
uint8) to ``smart_resize``'s size, rescale by 1/255 in float64 then cast to float32, normalize
with the CLIP mean and std in float32, repeat the single frame ``temporal_patch_size`` times and
flatten 14x14 patches in merge-window order (each 2x2 window of patches is contiguous, so the
encoder's patch merger can take 4 consecutive rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pagedllm.multimodal.image_tokens import (
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    ImageGrid,
    image_grid,
    pixel_limits,
)

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
# vLLM's --mm-processor-kwargs for Qwen2-VL: only the pixel budget is a per-server choice; the
# patch sizes and normalization belong to the trained model.
OVERRIDE_KEYS = ("min_pixels", "max_pixels", "size")
_SIZE_KEYS = ("shortest_edge", "longest_edge")
# Settings transformers would honour but this processor fixes to Qwen2-VL's values.
_FIXED_SETTINGS = {"do_resize": True, "do_rescale": True, "do_normalize": True,
                   "do_convert_rgb": True, "resample": Image.Resampling.BICUBIC,
                   "rescale_factor": 1 / 255}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The numbers that turn an image into patches; validated at construction."""

    patch_size: int = PATCH_SIZE
    temporal_patch_size: int = 2
    merge_size: int = MERGE_SIZE
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                     "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels "
                             f"({self.max_pixels})")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")

    @classmethod
    def from_model_dir(cls, folder: str | None,
                       overrides: dict[str, Any] | None = None) -> ImageProcessorConfig:
        """The folder's ``preprocessor_config.json`` (defaults where absent), then the server's
        overrides (``--mm-processor-kwargs``). Raises ValueError naming a bad key or value."""
        pre: dict[str, Any] = {}
        path = Path(folder) / PREPROCESSOR_FILE if folder else None
        if path is not None and path.is_file():
            try:
                pre = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read {path}: {err}") from err
            _warn_fixed_settings(pre, path)
        return cls.from_dict(pre, overrides)

    @classmethod
    def from_dict(cls, pre: dict[str, Any],
                  overrides: dict[str, Any] | None = None) -> ImageProcessorConfig:
        """From a ``preprocessor_config.json``'s contents, then the server's overrides."""
        overrides = dict(overrides or {})
        _check_overrides(overrides)
        limits = pixel_limits(overrides, pixel_limits(pre))
        known = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels"}
        return cls(**{k: v for k, v in pre.items() if k in known},
                   min_pixels=limits[0], max_pixels=limits[1])

    @property
    def patch_dim(self) -> int:
        """Width of one row of ``pixel_values``: 3 * 2 * 14 * 14 = 1176."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def grid(self, width: int, height: int) -> ImageGrid:
        """The patch grid of a ``width x height`` image under these limits."""
        return image_grid(width, height, self.min_pixels, self.max_pixels, self.patch_size,
                          self.merge_size)

    def max_image_size(self) -> tuple[int, int]:
        """(width, height) of an image that costs the most tokens under ``max_pixels``: the
        dummy image to profile the vision encoder's peak memory with. Sides are multiples of
        28, so ``smart_resize`` keeps it as is; the squarest such image is chosen. Only when
        min_pixels is close to max_pixels can another image cost more (``max_image_tokens``)."""
        factor = self.patch_size * self.merge_size
        cells = max(1, self.max_pixels // factor ** 2)  # one cell = one merged token
        best = (1, 1)
        for short in range(math.isqrt(cells), 0, -1):
            long = min(cells // short, MAX_ASPECT_RATIO * short)
            if short * long > best[0] * best[1]:
                best = (short, long)
        return best[1] * factor, best[0] * factor

    def max_image_tokens(self) -> int:
        """An upper bound on the tokens of any image, for budgets (max_model_len, encoder cache).

        Usually ``max_image_size()``'s count (max_pixels / 28^2). Two corners of
        ``smart_resize`` cost more. Scaling down keeps each side at least 28 pixels, so under
        a max_pixels below 200 tokens a thin image's long side keeps sqrt(200 * max) pixels.
        Scaling up (rounded area under min_pixels) rounds both sides up, which overshoots
        max_pixels when min_pixels is near it: a 200x1 image under min = max = 256 * 28^2
        costs 227 x 2 = 454 tokens, not 256.
        """
        factor_area = (self.patch_size * self.merge_size) ** 2
        best = self.grid(*self.max_image_size()).num_tokens
        best = max(best, math.floor(math.sqrt(self.max_pixels / factor_area * MAX_ASPECT_RATIO)))
        cells = self.min_pixels / factor_area
        # Scaled up to `cells`, the long side spans u cells, u in [lo, hi] by the aspect limit,
        # and the short side cells / u; both are rounded up. For a long side of k cells
        # (u in (k-1, k]) the short side is largest at the smallest u.
        lo, hi = math.sqrt(cells / MAX_ASPECT_RATIO), math.sqrt(cells * MAX_ASPECT_RATIO)
        for k in range(1, math.ceil(hi) + 1):
            u = max(k - 1, lo)
            if u <= hi:
                best = max(best, k * (math.floor(cells / u) + 1))
        return best


def _check_overrides(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown --mm-processor-kwargs key(s) {', '.join(unknown)}: "
                         f"supported are {', '.join(OVERRIDE_KEYS)}")
    size = overrides.get("size")
    if size is not None and (not isinstance(size, dict) or set(size) - set(_SIZE_KEYS)):
        raise ValueError(f"--mm-processor-kwargs size must be a dict with keys "
                         f"{', '.join(_SIZE_KEYS)}, got {size!r}")


def _warn_fixed_settings(pre: dict[str, Any], path: Path) -> None:
    for key, expected in _FIXED_SETTINGS.items():
        value = pre.get(key, expected)
        if not isinstance(value, (int, float)) or not math.isclose(value, expected):
            logger.warning("%s sets %s=%r; pagedllm's Qwen2-VL processor always uses %r",
                           path, key, value, expected)


@dataclass(eq=False)  # identity equality (tensors don't compare); content_hash: same picture
class ProcessedImage:
    """One image, ready for the vision encoder."""

    pixel_values: torch.Tensor  # [grid_t * grid_h * grid_w, patch_dim] float32, merge-window order
    grid_thw: tuple[int, int, int]  # (frames / temporal_patch_size, patches down, patches across)
    num_tokens: int  # <|image_pad|> tokens in the prompt: t * h * w // merge_size**2
    content_hash: str  # sha256 of the RGB pixels: same picture, same hash, whatever the file format


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers makes it: transparency is composited onto white (a plain convert
    would expose whatever colour hides under alpha 0). An RGB image comes back as is."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def content_hash(rgb: Image.Image) -> str:
    """sha256 over mode, size and decoded pixels; keys the prefix cache, so it must not depend
    on how the picture was encoded."""
    digest = hashlib.sha256(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def process_image(image: Image.Image, config: ImageProcessorConfig) -> ProcessedImage:
    """Resize, normalize and patchify one image as ``Qwen2VLImageProcessorPil`` does.

    Raises ValueError for an aspect ratio above 200 (``smart_resize``'s limit).
    """
    rgb = to_rgb(image)
    grid = config.grid(rgb.width, rgb.height)
    resized = rgb.resize((grid.resized_width, grid.resized_height), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.uint8)  # [H, W, 3]
    # transformers rescales in float64 and casts once, then normalizes in float32.
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std
    patches = _patchify(normalized, config)
    t = 1  # one picture, repeated temporal_patch_size times inside each patch
    return ProcessedImage(
        pixel_values=torch.from_numpy(patches),
        grid_thw=(t, grid.grid_h, grid.grid_w),
        num_tokens=t * grid.num_tokens,
        content_hash=content_hash(rgb))


def _patchify(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """[H, W, C] -> [grid_h * grid_w, C * T * p * p], rows in merge-window order: window by
    window (row-major), then the m x m patches inside a window (row-major)."""
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width, channels = image.shape
    gh, gw = height // p, width // p
    # [gh/m, m, p, gw/m, m, p, C] -> [gh/m, gw/m, m, m, C, p, p]
    windows = image.reshape(gh // m, m, p, gw // m, m, p, channels)
    windows = windows.transpose(0, 3, 1, 4, 6, 2, 5)
    # repeat the frame along a temporal axis after C: [..., C, T, p, p]
    frames = np.broadcast_to(windows[:, :, :, :, :, None], (*windows.shape[:5], t, p, p))
    return np.ascontiguousarray(frames.reshape(gh * gw, channels * t * p * p))
