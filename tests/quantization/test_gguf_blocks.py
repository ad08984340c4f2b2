"""The loader's own Q4_1 dequantizer gives gguf's values exactly (the float32 reference path
loads through it)."""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from pagedllm.models.loader.gguf import dequantize_q4_1


def test_q4_1_dequantizer_equals_gguf() -> None:
    rng = np.random.default_rng(0)
    rows, blocks = 12, 5
    scales = rng.normal(0.0, 0.02, (rows, blocks, 2)).astype(np.float16)  # d and m
    nibbles = rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8)
    data = np.concatenate([scales.view(np.uint8), nibbles], axis=-1).reshape(rows, -1)
    expected = dequantize(data, GGMLQuantizationType.Q4_1).reshape(rows, -1)
    out = dequantize_q4_1(data)
    assert out.dtype == np.float32 and out.shape == (rows, blocks * 32)
    assert np.array_equal(out, expected)
