"""Token bitmasks (xgrammar's layout): int32 words, bit j of word i = token 32 i + j allowed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepBitmask:
    """One step's token masks, for the sampling rows that have one (the others pay nothing).
    ``rows`` index the step's sampling rows (its scheduled requests that sample, in order)."""

    rows: np.ndarray  # [k] int64
    bitmask: np.ndarray  # [k, ceil(vocab / 32)] int32


def token_bitmask_row(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """[words] int32 with exactly ``token_ids`` allowed."""
    allowed = np.zeros(-(-vocab_size // 32) * 32, np.bool_)
    allowed[token_ids] = True
    return np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32)


def clear_token(bitmask: np.ndarray, row: int, token_id: int) -> None:
    """Disallows ``token_id`` in ``bitmask[row]``."""
    words = bitmask.view(np.uint32)
    words[row, token_id // 32] &= np.uint32(~(1 << (token_id % 32)) & 0xFFFFFFFF)


def allowed_tokens(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """[vocab] bool of one row (for tests and debugging)."""
    bits = np.unpackbits(bitmask_row.astype("<i4").view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
