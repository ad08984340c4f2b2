"""What a prompt's images become once processed: pixels, placeholder ranges, M-RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedllm.multimodal.image_processor import ProcessedImage


@dataclass(frozen=True)
class ImageFeature:
    """One image of a prompt: its pixels and the prompt positions its tokens fill."""

    offset: int  # index of its first image token in the prompt
    image: ProcessedImage

    @property
    def num_tokens(self) -> int:
        return self.image.num_tokens

    @property
    def end(self) -> int:
        return self.offset + self.image.num_tokens


@dataclass(frozen=True)
class MRopePositions:
    """Qwen2-VL's 3-row (temporal, height, width) positions of a prompt. Tokens after the
    prompt (outputs) at sequence index ``p`` sit at ``p + delta`` in all three rows."""

    positions: np.ndarray  # [3, num_prompt_tokens] int64
    delta: int
