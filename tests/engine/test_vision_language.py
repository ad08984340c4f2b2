"""Qwen2-VL through the engine: greedy output equals transformers' generate token for token
(float32, tiny random model) with 0, 1 and 2 images, however prefill is chunked; image-aware
prefix caching; the encoder runs once per image; limits and bad images are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pagedllm import LLM, SamplingParams
from tests.conftest import IMAGE_PAD_ID

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# (prompt, images): 0, 1 and 2 images of different sizes (64, 20 and 45 image tokens).
CASES = [
    (chat_prompt("Tell me a story about the sea."), []),
    (chat_prompt(f"{IMAGE}What is in this picture?"), [random_image(224, 224, 1)]),
    (chat_prompt(f"Compare {IMAGE} with {IMAGE} please."),
     [random_image(140, 112, 2), random_image(150, 260, 3)]),
]


@pytest.fixture(scope="module")
def expected(tiny_qwen2_vl_dir) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy output) per case, by transformers: its image processor and tokenizer
    (each placeholder expanded as its Qwen2VLProcessor does; that class needs torchvision to
    load) and its model's generate."""
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_qwen2_vl_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos
    images_of = transformers.Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_vl_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_vl_dir)
    out = []
    for text, images in CASES:
        kwargs = {}
        if images:
            kwargs = dict(images_of(images=images, return_tensors="pt"))
            for t, h, w in kwargs["image_grid_thw"].tolist():
                text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
            text = text.replace("<|placeholder|>", "<|image_pad|>")
        ids = tokenizer(text, return_tensors="pt")
        if images:  # which tokens are image tokens, for M-RoPE (the processor's output too)
            kwargs["mm_token_type_ids"] = (ids["input_ids"] == IMAGE_PAD_ID).int()
        with torch.no_grad():
            generated = model.generate(**ids, **kwargs, max_new_tokens=MAX_TOKENS,
                                       do_sample=False)
        prompt = ids["input_ids"][0].tolist()
        out.append((prompt, generated[0, len(prompt):].tolist()))
    return out


def _prompts() -> list[dict]:
    return [{"prompt": text, "multi_modal_data": {"image": images}} for text, images in CASES]


def _check(llm: LLM, expected) -> None:
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    for (want_prompt, want), out in zip(expected, outputs):
        assert out.prompt_token_ids == want_prompt
        assert out.outputs[0].token_ids == want
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"
    assert not llm.engine.core.runner.encoder_cache._outputs, "encoder outputs leaked"


def test_image_prompts_match_transformers(tiny_qwen2_vl_dir, expected):
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024)
    _check(llm, expected)


def test_chunked_prefill_splits_images_and_stays_exact(tiny_qwen2_vl_dir, expected,
                                                       monkeypatch):
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024,
              max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False)
    cache = llm.engine.core.runner.encoder_cache
    encoded: list[int] = []
    original = cache.encode

    def counting(images):
        encoded.extend(image.num_tokens for image in images)
        return original(images)

    monkeypatch.setattr(cache, "encode", counting)
    _check(llm, expected)
    # 16-token chunks cut every image, yet each is encoded exactly once.
    assert sorted(encoded) == [20, 45, 64]


def test_prefix_cache_tells_images_apart(tiny_qwen2_vl_dir):
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024)
    text = chat_prompt(f"{IMAGE}What is in this picture?")
    kv = llm.engine.core.kv_cache

    def run(image: Image.Image) -> tuple[list[int], int]:
        hits = kv.prefix_cache_hits
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, GREEDY,
                           use_tqdm=False)[0]
        return out.outputs[0].token_ids, kv.prefix_cache_hits - hits

    first, hits = run(random_image(224, 224, 1))
    assert hits == 0
    again, hits = run(random_image(224, 224, 1))  # the same pixels: the image blocks hit
    assert again == first and hits >= 64
    other, hits = run(random_image(224, 224, 9))  # same text, other image: only blocks before
    assert hits < 16  # the image (fewer than one block of 16 here) may be reused
    fresh = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024,
                enable_prefix_caching=False)
    assert other == fresh.generate({"prompt": text, "multi_modal_data": {
        "image": random_image(224, 224, 9)}}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_image_token_counts_and_errors(tiny_qwen2_vl_dir):
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024,
              limit_mm_per_prompt={"image": 1})
    processor = llm.engine.input_processor
    for size, tokens in (((224, 224), 64), ((448, 448), 256), ((56, 56), 4)):
        prompt = processor.process({"prompt": IMAGE, "multi_modal_data": {
            "image": random_image(*size, seed=0)}})
        assert prompt.token_ids.count(IMAGE_PAD_ID) == tokens == prompt.num_image_tokens
    two = {"prompt": IMAGE * 2, "multi_modal_data": {"image": [random_image(56, 56, 0)] * 2}}
    with pytest.raises(ValueError, match="At most 1 image"):
        llm.generate(two, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 image placeholder"):
        processor.process({"prompt": IMAGE * 2, "multi_modal_data": {
            "image": random_image(56, 56, 0)}})
    with pytest.raises(ValueError):
        llm.generate({"prompt": IMAGE, "multi_modal_data": {"image": b"not an image"}}, GREEDY,
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_chat_with_a_pil_image_equals_the_rendered_prompt(tiny_qwen2_vl_dir):
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=1024)
    image = random_image(84, 56, 4)
    chat = llm.chat([{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image}, {"type": "text", "text": "What is it?"}]}],
        GREEDY, use_tqdm=False)[0]
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            + chat_prompt(f"{IMAGE}What is it?"))
    direct = llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, GREEDY,
                          use_tqdm=False)[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    assert chat.prompt_token_ids.count(IMAGE_PAD_ID) == 6  # 84x56 -> 3 x 2 merged patches
