"""On a GPU: the tiny random Qwen2-VL through pagedllm (Triton attention and fused kernels,
CUDA graphs for decode, chunked prefill through images) against transformers, token-exact in
float32. Skipped without CUDA."""

from __future__ import annotations

import inspect

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.conftest import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID, build_tiny_qwen2_vl
from tests.engine.test_vision_language import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MAX_TOKENS = 16
IMAGE = [VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from pagedllm.tokenizer import placeholder_tokenizer

    folder = str(tmp_path_factory.mktemp("tiny-qwen2-vl"))
    return build_tiny_qwen2_vl(folder, placeholder_tokenizer(49152))  # no GGUF on this machine


def _cases() -> list[tuple[list[int], list]]:
    gen = torch.Generator().manual_seed(3)

    def text(n: int) -> list[int]:
        return torch.randint(3, 49152, (n,), generator=gen).tolist()

    return [(text(40), []),
            (text(9) + IMAGE + text(30), [random_image(224, 224, 1)]),
            (text(5) + IMAGE + text(7) + IMAGE + text(60),
             [random_image(140, 112, 2), random_image(150, 260, 3)])]


def _hf_greedy(model, images_of, ids: list[int], images: list) -> list[int]:
    kwargs = {}
    if images:
        kwargs = {k: v.to("cuda") for k, v in images_of(images=images, return_tensors="pt").items()}
        expanded = []
        grids = iter(kwargs["image_grid_thw"].tolist())
        for t in ids:
            if t == IMAGE_PAD_ID:
                g = next(grids)
                expanded += [IMAGE_PAD_ID] * (g[0] * g[1] * g[2] // 4)
            else:
                expanded.append(t)
        ids = expanded
    input_ids = torch.tensor([ids], device="cuda")
    if images and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == IMAGE_PAD_ID).int()  # transformers >= 5.2x
    out = model.generate(input_ids, **kwargs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("chunk,eager", [(None, False), (16, False), (None, True)])
def test_greedy_fp32_with_images_matches_transformers(model_dir, chunk, eager):
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32).to("cuda").eval()
    model.generation_config.eos_token_id = None
    processor = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    images_of = (processor or transformers.Qwen2VLImageProcessor).from_pretrained(model_dir)
    cases = _cases()
    with torch.no_grad():
        expected = [_hf_greedy(model, images_of, ids, images) for ids, images in cases]
    del model
    llm = LLM(model_dir, dtype="float32", max_model_len=1024, enforce_eager=eager,
              max_num_batched_tokens=chunk, max_num_seqs=8 if chunk else 256,
              kv_cache_memory_bytes=256 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
                            for ids, images in cases], params, use_tqdm=False)
    for want, out in zip(expected, outputs):
        assert out.outputs[0].token_ids == want
    assert llm.engine.core.kv_cache.num_free_blocks == llm.engine.core.kv_cache.pool.num_blocks
