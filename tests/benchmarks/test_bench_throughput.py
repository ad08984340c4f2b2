"""bench throughput's random-mm workload (workloads.py), transformers' batched image inputs, exact
against pagedllm (hf_reference.py), and the command end to end on the tiny Qwen2-VL."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import random_image
from pagedllm.benchmarks.hf_reference import hf_inputs, load_transformers_model
from pagedllm.benchmarks.workloads import (
    Workload,
    image_placeholder,
    make_mm_workload,
    parse_image_size,
)
from pagedllm.entrypoints.cli import main as cli_main
from tests.conftest import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID

PLACEHOLDER = [VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID]


def _args(**overrides) -> argparse.Namespace:
    args = dict(workload="random-mm", num_prompts=3, input_len=5, output_len=4,
                images_per_prompt=2, image_size=(56, 84), workload_seed=0)
    return argparse.Namespace(**{**args, **overrides})


def test_mm_workload_wraps_each_image_then_random_text() -> None:
    work = make_mm_workload(_args(), PLACEHOLDER)
    assert work.output_lens == [4, 4, 4] and work.image_token_id == IMAGE_PAD_ID
    for prompt, images in zip(work.prompts, work.images, strict=True):
        assert prompt[:6] == PLACEHOLDER * 2 and len(prompt) == 6 + 5
        assert all(0 <= t < VISION_START_ID for t in prompt[6:])  # text below the vision ids
        assert [image.size for image in images] == [(56, 84)] * 2
    again = make_mm_workload(_args(), PLACEHOLDER)
    assert again.prompts == work.prompts
    assert again.images[2][1].tobytes() == work.images[2][1].tobytes()
    other = make_mm_workload(_args(workload_seed=1), PLACEHOLDER)
    assert other.images[0][0].tobytes() != work.images[0][0].tobytes()
    engine_prompt = work.select([1]).engine_prompts()[0]
    assert engine_prompt == {"prompt_token_ids": work.prompts[1],
                             "multi_modal_data": {"image": work.images[1]}}


def test_mm_flags_and_model_are_checked_before_loading(tiny_qwen2_vl_dir) -> None:
    assert image_placeholder(_args(), tiny_qwen2_vl_dir) == PLACEHOLDER
    assert image_placeholder(_args(workload="random"), None) is None
    with pytest.raises(ValueError, match="images-per-prompt"):
        image_placeholder(_args(images_per_prompt=0), tiny_qwen2_vl_dir)
    with pytest.raises(ValueError, match="needs an image model"):
        image_placeholder(_args(), None)  # the default model: text only
    assert parse_image_size("224x112") == (224, 112)
    for bad in ("224", "0x5", "ax4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_image_size(bad)


def test_transformers_batches_images_exactly(tiny_qwen2_vl_dir) -> None:
    """Left padding, several images in a prompt and mixed sizes in a batch: transformers'
    batched greedy tokens equal pagedllm's (float32)."""
    rng = np.random.default_rng(0)
    images = [[random_image(rng, 56, 56)], [random_image(rng, 112, 56)] * 2,
              [random_image(rng, 84, 140)]]
    prompts = [PLACEHOLDER * len(imgs) + list(range(100, 100 + 3 + 6 * i))
               for i, imgs in enumerate(images)]
    work = Workload(prompts, [4] * 3, images, IMAGE_PAD_ID)
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = [o.outputs[0].token_ids
                for o in llm.generate(work.engine_prompts(), greedy, use_tqdm=False)]
    model = load_transformers_model(tiny_qwen2_vl_dir, "auto", torch.float32,
                                    torch.device("cpu"))
    inputs = hf_inputs(model, work, [0, 1, 2], llm.engine.input_processor.image_config)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 4, 8], [1, 10, 6]]
    assert (inputs["input_ids"] == IMAGE_PAD_ID).sum(1).tolist() == [4, 16, 15]
    assert inputs["attention_mask"][0, 0] == 0  # the shortest prompt is left-padded
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == expected


def test_cli_random_mm_against_transformers(tiny_qwen2_vl_dir, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "report.json"
    rc = cli_main(["bench", "throughput", tiny_qwen2_vl_dir, "--workload", "random-mm",
                   "--num-prompts", "4", "--image-size", "56x56", "--input-len", "8",
                   "--output-len", "4", "--compare-transformers", "--hf-batch-sizes", "4",
                   "--kv-cache-memory-bytes", str(64 * 2**20), "--output-json", str(path)])
    assert rc == 0
    assert "TTFT b1 ms" in capsys.readouterr().out
    ours, theirs = json.loads(path.read_text())
    assert ours["name"] == "pagedllm" and theirs["name"] == "transformers (batch 4)"
    assert ours["output_tokens"] == theirs["output_tokens"] == 16
    # 4 prompts x (8 text + start + 4 image tokens of a 56x56 image + end), none cached.
    assert ours["prompt_tokens_computed"] == 4 * 14
    assert ours["ttft_ms"] > 0 and ours["ttft_batch1_ms"] > 0
    assert theirs["ttft_ms"] is None and theirs["ttft_batch1_ms"] > 0
    assert min(ours["output_tokens_per_s"], theirs["output_tokens_per_s"]) > 0


def test_cli_random_mm_refuses_a_text_model(capsys) -> None:
    assert cli_main(["bench", "throughput", "--workload", "random-mm"]) == 2
