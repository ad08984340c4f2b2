"""transformers as the reference: the same ``Workload`` through ``generate``, batched with left
padding (image prompts as ``Qwen2VLProcessor`` would give them), and its batch-1 TTFT."""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pagedllm.benchmarks.workloads import RunResult, Workload

if TYPE_CHECKING:
    import torch

    from pagedllm.multimodal.image_processor import ImageProcessorConfig

logger = logging.getLogger(__name__)


def run_transformers(model, workload: Workload, batch_size: int,  # noqa: ANN001
                     image_config: ImageProcessorConfig | None = None) -> RunResult:
    """transformers' batched greedy generate, left-padded; requests sorted by output length so a
    batch wastes little; only the requested tokens count. Images are preprocessed inside the
    timing, batch by batch."""
    import torch

    order = sorted(range(len(workload.prompts)), key=lambda i: -workload.output_lens[i])
    device = next(model.parameters()).device
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        new = max(workload.output_lens[i] for i in batch)
        with torch.no_grad():
            model.generate(**hf_inputs(model, workload, batch, image_config),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return RunResult(f"transformers (batch {batch_size})", seconds, workload.num_output_tokens)


def transformers_ttft(model, probes: Workload,  # noqa: ANN001
                      image_config: ImageProcessorConfig | None = None) -> float:
    """Median time (ms) of ``generate(max_new_tokens=1)`` on each probe alone, preprocessed
    beforehand (as pagedllm's TTFT starts after preprocessing)."""
    import torch

    device = next(model.parameters()).device
    times = []
    for i in range(len(probes.prompts)):
        inputs = hf_inputs(model, probes, [i], image_config)
        _synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def hf_inputs(model, workload: Workload, batch: Sequence[int],  # noqa: ANN001
              image_config: ImageProcessorConfig | None = None) -> dict[str, torch.Tensor]:
    """One left-padded batch of ``generate`` inputs on the model's device."""
    import torch

    prompts = [workload.prompts[i] for i in batch]
    extra: dict[str, torch.Tensor] = {}
    if workload.images is not None:
        prompts, extra = _expand_images(workload, batch, image_config)
    width = max(map(len, prompts))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    # transformers >= 5 finds image tokens (for M-RoPE) by type, not by id; pads are type 0.
    if extra and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        extra["mm_token_type_ids"] = (ids == workload.image_token_id).int()
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask,
                                         **extra}.items()}


def _expand_images(workload: Workload, batch: Sequence[int],
                   image_config: ImageProcessorConfig | None,
                   ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """(prompts with each placeholder repeated to its image's token count, as Qwen2VLProcessor
    does, and the batch's pixel_values and image_grid_thw, images in prompt order)."""
    import torch

    from pagedllm.multimodal.image_processor import ImageProcessorConfig, process_image

    assert workload.images is not None
    config = image_config or ImageProcessorConfig()
    pad = workload.image_token_id
    prompts, pixels, grids = [], [], []
    for i in batch:
        images = iter([process_image(image, config) for image in workload.images[i]])
        prompt: list[int] = []
        for token in workload.prompts[i]:
            if token != pad:
                prompt.append(token)
                continue
            image = next(images)
            prompt += [pad] * image.num_tokens
            pixels.append(image.pixel_values)
            grids.append(image.grid_thw)
        prompts.append(prompt)
    return prompts, {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_transformers_model(model: str | None, load_format: str, dtype, device):  # noqa: ANN001, ANN201
    """transformers' model of the same files pagedllm serves (random weights for dummy); an
    image-text model (a config with ``vision_config``, e.g. Qwen2-VL) as its image-text class."""
    import os

    import torch
    import transformers

    from pagedllm.models.loader.source import resolve_model

    source = resolve_model(model)
    if source.kind == "gguf":
        folder, name = os.path.split(source.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=dtype)
        return model.to(device).eval()
    config = transformers.AutoConfig.from_pretrained(source.path)
    auto = (transformers.AutoModelForImageTextToText if hasattr(config, "vision_config")
            else transformers.AutoModelForCausalLM)
    if load_format == "dummy":
        torch.manual_seed(0)
        with torch.device(device):  # initialized in place: a 7B model's init is slow on a CPU
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(source.path, dtype=dtype)
    logger.info("transformers model: %s", type(model).__name__)
    return model.to(device).eval()
