"""InputProcessor: what a user sends (text, token ids, images) -> the prompt the engine schedules.

A prompt is text, token ids, or a dict ``{"prompt": text}`` / ``{"prompt_token_ids": ids}`` with
an optional ``"multi_modal_data": {"image": image or [images]}``. For an image model, each image's
single placeholder token (Qwen2-VL's ``<|image_pad|>``) is expanded to as many tokens as the image
costs, and the prompt's multimodal rotary positions are computed once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedllm.config import MultiModalConfig
from pagedllm.models.arch import ModelArch
from pagedllm.multimodal.image_processor import ImageProcessorConfig, process_image
from pagedllm.multimodal.inputs import ImageFeature, MRopePositions
from pagedllm.multimodal.media import load_image
from pagedllm.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]


@dataclass(frozen=True)
class ProcessedPrompt:
    token_ids: list[int]
    text: str | None = None
    images: tuple[ImageFeature, ...] = ()
    mrope: MRopePositions | None = None

    @property
    def num_image_tokens(self) -> int:
        return sum(f.num_tokens for f in self.images)


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, arch: ModelArch, config: MultiModalConfig,
                 image_config: ImageProcessorConfig | None) -> None:
        self.tokenizer = tokenizer
        self.arch = arch
        self.config = config
        self.image_config = image_config  # None: the model takes no images

    @property
    def supports_images(self) -> bool:
        return self.image_config is not None

    def process(self, prompt: PromptType | ProcessedPrompt) -> ProcessedPrompt:
        """Raises ValueError with a message fit for the user on anything it cannot take."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        text, token_ids, images = _unpack(prompt)
        if text is not None:
            token_ids = self.tokenizer.encode(text)
        if not images:
            return ProcessedPrompt(list(token_ids), text)
        return self._with_images(list(token_ids), text, images)

    def _with_images(self, token_ids: list[int], text: str | None,
                     images: list[Any]) -> ProcessedPrompt:
        if self.image_config is None:
            raise ValueError(f"The model ({self.arch.architecture}) does not take image inputs.")
        cfg = self.config
        limit = cfg.image_limit()
        if limit is not None and len(images) > limit:
            raise ValueError(
                f"At most {limit} image(s) may be given in one prompt (--limit-mm-per-prompt "
                f"'{{\"image\": {limit}}}'), but this prompt has {len(images)}.")
        pad = self.arch.image_token_id
        slots = [i for i, t in enumerate(token_ids) if t == pad]
        if len(slots) != len(images):
            name = self.tokenizer.convert_ids_to_tokens([pad])[0]
            raise ValueError(f"The prompt has {len(slots)} image placeholder(s) ({name}) but "
                             f"{len(images)} image(s) were given.")
        expanded: list[int] = []
        features: list[ImageFeature] = []
        start = 0
        for slot, source in zip(slots, images):
            pixels = load_image(source, allowed_local_media_path=cfg.allowed_local_media_path,
                                allowed_media_domains=cfg.allowed_media_domains)
            image = process_image(pixels, self.image_config)
            expanded += token_ids[start:slot]
            features.append(ImageFeature(len(expanded), image))
            expanded += [pad] * image.num_tokens
            start = slot + 1
        expanded += token_ids[start:]
        mrope = None
        if self.arch.mrope_section:
            from pagedllm.models.qwen2_vl import mrope_positions

            mrope = MRopePositions(*mrope_positions(
                expanded, [f.image.grid_thw for f in features], self.arch))
        return ProcessedPrompt(expanded, text, tuple(features), mrope)


def _unpack(prompt: PromptType) -> tuple[str | None, Sequence[int], list[Any]]:
    """(text, token ids, images) of a prompt in any of the accepted forms."""
    if isinstance(prompt, str):
        return prompt, (), []
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
        if unknown:
            raise ValueError(f"Unknown prompt field(s): {sorted(unknown)}")
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise ValueError("A prompt dict needs exactly one of 'prompt' and "
                             "'prompt_token_ids'.")
        data = prompt.get("multi_modal_data") or {}
        unknown = set(data) - {"image"}
        if unknown:
            raise ValueError(f"multi_modal_data: modality {sorted(unknown)[0]!r} is not "
                             "supported; pagedllm takes images only.")
        images = data.get("image", [])
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if "prompt" in prompt:
            return str(prompt["prompt"]), (), images
        return None, list(prompt["prompt_token_ids"]), images
    return None, list(prompt), []
