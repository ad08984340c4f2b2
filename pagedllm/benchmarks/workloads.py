"""bench throughput's workloads: token-id prompts (with PIL images for random-mm), their output
lengths, and what one run of them measured. The workloads themselves are described in
``pagedllm.benchmarks.throughput``."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pagedllm.benchmarks.datasets import random_image
from pagedllm.multimodal import image_tokens

if TYPE_CHECKING:
    from PIL import Image

    from pagedllm.engine.inputs import PromptType

WARMUP_PROMPTS = 2
TTFT_RUNS = 3  # batch-1 TTFT: the median of this many prompts, each run alone
IMAGE_TOKEN_KEYS = ("vision_start_token_id", "image_token_id", "vision_end_token_id")


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    images: list[list[Image.Image]] | None = None  # per prompt, one per image placeholder in it
    image_token_id: int | None = None  # the placeholder transformers expands per image

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    def select(self, indices: Sequence[int], output_len: int | None = None) -> Workload:
        """The prompts at ``indices`` with their images; every output ``output_len`` if given."""
        images = None if self.images is None else [self.images[i] for i in indices]
        return Workload([self.prompts[i] for i in indices],
                        [output_len or self.output_lens[i] for i in indices], images,
                        self.image_token_id)

    def engine_prompts(self) -> list[PromptType]:
        """What ``LLM.generate`` takes: token ids, with their images where there are any."""
        if self.images is None:
            return list(self.prompts)
        return [{"prompt_token_ids": p, "multi_modal_data": {"image": images}}
                for p, images in zip(self.prompts, self.images, strict=True)]


@dataclass
class RunResult:
    name: str
    seconds: float
    output_tokens: int
    prompt_tokens_computed: int | None = None
    ttft_ms: float | None = None  # median over this run's requests
    ttft_batch1_ms: float | None = None  # median over prompts run alone

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(args: argparse.Namespace, vocab_size: int,
                  placeholder: list[int] | None = None) -> Workload:
    """The ``--workload``'s prompts (random-mm: ``placeholder`` from ``image_placeholder``)."""
    if args.workload == "random-mm":
        assert placeholder is not None
        return make_mm_workload(args, placeholder)
    rng = random.Random(args.workload_seed)

    def draw(mean: int, ratio: float) -> int:
        lo, hi = int(mean * (1 - ratio)), int(mean * (1 + ratio))
        return max(1, rng.randint(lo, hi))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    if args.workload == "nano-vllm":
        n = 256
        return Workload([tokens(rng.randint(100, 1024)) for _ in range(n)],
                        [rng.randint(100, 1024) for _ in range(n)])
    prefix = tokens(args.prefix_len) if args.workload == "shared-prefix" else []
    prompts = [prefix + tokens(draw(args.input_len, args.range_ratio))
               for _ in range(args.num_prompts)]
    return Workload(prompts, [draw(args.output_len, args.output_range_ratio)
                              for _ in range(args.num_prompts)])


def image_placeholder(args: argparse.Namespace, model: str | None) -> list[int] | None:
    """random-mm's [vision start, image pad, vision end] token ids from the model's config (None
    for other workloads). Raises ValueError on bad flags or a model that takes no images, before
    any model loads."""
    from pagedllm.models.loader.source import load_hf_config, resolve_model

    if args.workload != "random-mm":
        return None
    if args.images_per_prompt < 1 or args.input_len < 0 or args.output_len < 1:
        raise ValueError("random-mm needs --images-per-prompt >= 1, --input-len >= 0 and "
                         "--output-len >= 1")
    config = load_hf_config(resolve_model(model))
    ids = [config.get(key) for key in IMAGE_TOKEN_KEYS]
    if not all(isinstance(i, int) for i in ids):
        raise ValueError(f"--workload random-mm needs an image model; the config of "
                         f"{model or 'the default model'} lacks {', '.join(IMAGE_TOKEN_KEYS)}")
    return ids


def make_mm_workload(args: argparse.Namespace, placeholder: list[int]) -> Workload:
    """random-mm: each prompt's images (each wrapped in ``placeholder``), then its text."""
    rng = random.Random(args.workload_seed)
    pixels = np.random.default_rng(args.workload_seed)
    text_vocab = min(placeholder)  # text ids stay below the vision tokens
    prompts, images = [], []
    for _ in range(args.num_prompts):
        images.append([random_image(pixels, *args.image_size)
                       for _ in range(args.images_per_prompt)])
        prompts.append(placeholder * args.images_per_prompt
                       + [rng.randrange(text_vocab) for _ in range(args.input_len)])
    return Workload(prompts, [args.output_len] * args.num_prompts, images, placeholder[1])


def probe_workload(args: argparse.Namespace, vocab_size: int,
                   placeholder: list[int] | None = None) -> tuple[Workload, Workload]:
    """(warm-up, batch-1 TTFT) prompts: like the workload's, drawn with another seed."""
    n = WARMUP_PROMPTS + TTFT_RUNS
    probe_args = argparse.Namespace(**{**vars(args), "workload_seed": args.workload_seed + 1,
                                       "num_prompts": n})
    probes = make_workload(probe_args, vocab_size, placeholder)
    return probes.select(range(WARMUP_PROMPTS), 4), probes.select(range(WARMUP_PROMPTS, n), 1)


def parse_image_size(text: str) -> tuple[int, int]:
    """"224x224" -> (width, height), as an argparse type."""
    try:
        return image_tokens.parse_image_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
