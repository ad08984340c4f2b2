"""The multimodal part of a step: image embeddings for the scheduled tokens, M-RoPE positions.

The vision encoder runs on an image the first time a scheduled chunk reaches any of its tokens;
its output waits in the ``EncoderCache`` until a step covering the image's last token is prepared,
so an image split across prefill chunks is encoded once. A preempted request keeps what it has
not consumed yet; a finished one drops everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedllm.core.scheduler import NewRequestData, ScheduledRequest
from pagedllm.multimodal.image_processor import ProcessedImage
from pagedllm.worker.device_copy import to_device


@dataclass
class StepImages:
    """The image tokens of one step: their rows in the flattened batch and their embeddings."""

    token_index: torch.Tensor  # [N] int64, ascending
    embeds: torch.Tensor  # [N, hidden]


class EncoderCache:
    def __init__(self, model: nn.Module, device: torch.device, budget_tokens: int) -> None:
        self.model = model
        self.device = device
        # Most image tokens one encoder call produces (a larger image goes alone): it bounds
        # the encoder's activation memory, which start-up profiles at this size.
        self.budget_tokens = budget_tokens
        self._outputs: dict[str, dict[int, torch.Tensor]] = {}  # request -> image -> embeds

    def free(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)

    def step_images(self, scheduled: list[ScheduledRequest],
                    requests: Mapping[str, NewRequestData]) -> StepImages | None:
        """Encodes the images this step reaches for the first time (in one encoder call) and
        gathers the embedding rows of every scheduled image token, in batch order."""
        self._encode_new(scheduled, requests)
        index: list[np.ndarray] = []
        pieces: list[torch.Tensor] = []
        row = 0
        for s in scheduled:
            req = requests[s.request_id]
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            for k, f in enumerate(req.images):
                lo, hi = max(start, f.offset), min(end, f.end)
                if lo >= hi:
                    continue
                outputs = self._outputs[req.request_id]
                pieces.append(outputs[k][lo - f.offset:hi - f.offset])
                index.append(np.arange(row + lo - start, row + hi - start))
                if hi == f.end:  # its last token is computed now: never needed again
                    del outputs[k]
            row += s.num_new_tokens
        if not pieces:
            return None
        return StepImages(to_device(np.concatenate(index), self.device),
                          torch.cat(pieces))

    def _encode_new(self, scheduled: list[ScheduledRequest],
                    requests: Mapping[str, NewRequestData]) -> None:
        todo = []
        for s in scheduled:
            req = requests[s.request_id]
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            outputs = self._outputs.setdefault(req.request_id, {}) if req.images else {}
            todo += [(outputs, k, f.image) for k, f in enumerate(req.images)
                     if f.offset < end and f.end > start and k not in outputs]
        group: list = []
        for i, item in enumerate(todo):
            group.append(item)
            tokens = sum(image.num_tokens for _, _, image in group)
            if i + 1 == len(todo) or tokens + todo[i + 1][2].num_tokens > self.budget_tokens:
                embeds = self.encode([image for _, _, image in group])
                for (outputs, k, _), e in zip(group, embeds):
                    outputs[k] = e
                group = []

    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        pixels = torch.cat([image.pixel_values for image in images]).to(self.device)
        return self.model.encode_images(pixels, [image.grid_thw for image in images])


def step_mrope_positions(scheduled: list[ScheduledRequest],
                         requests: Mapping[str, NewRequestData], num_tokens: int) -> np.ndarray:
    """[3, T] positions of a step: an image prompt's own (temporal, height, width) rows, and
    for every other token its sequence position (plus its request's offset after images) in
    all three rows."""
    out = np.empty((3, num_tokens), np.int64)
    row = 0
    for s in scheduled:
        req, n = requests[s.request_id], s.num_new_tokens
        start = s.num_computed_tokens
        if req.mrope is None:
            out[:, row:row + n] = np.arange(start, start + n)
        else:
            grid = req.mrope.positions
            k = max(0, min(start + n, grid.shape[1]) - start)
            out[:, row:row + k] = grid[:, start:start + k]
            out[:, row + k:row + n] = np.arange(start + k, start + n) + req.mrope.delta
        row += n
    return out
