"""Shared fixtures: the default model's files and tokenizer, loaded once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pagedllm.models.loader import ModelSource, resolve_model
from pagedllm.tokenizer import Tokenizer, load_tokenizer
from tests.processes import engine_core_pids, wait_gone


@pytest.fixture(scope="session", autouse=True)
def no_orphan_engine_cores() -> Iterator[None]:
    """After all tests, no engine core that this test process started is left running."""
    yield
    assert not wait_gone(engine_core_pids(os.getpid()), 5.0), "an engine core outlived its test"


@pytest.fixture(scope="session")
def default_source() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="session")
def default_tokenizer(default_source: ModelSource) -> Tokenizer:
    return load_tokenizer(default_source)


# The Qwen2-VL chat template (as the HF checkpoint ships it), enough for text and image parts.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Qwen2-VL's special tokens, appended to SmolLM2's 49,152-token vocabulary.
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 49152, 49153, 49154, 49155


# The tiny Qwen2-VL and Qwen2.5-VL's language model (M-RoPE over 2 + 3 + 3 rotary half-dims).
TINY_QWEN2_VL_TEXT = dict(vocab_size=49160, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def build_tiny_qwen2_vl(folder: str, default_tokenizer: Tokenizer) -> str:
    """A complete random-weight Qwen2-VL folder (config, safetensors, tokenizer with the vision
    tokens and chat template, preprocessor config), saved by transformers itself."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=TINY_QWEN2_VL_TEXT,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                           in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # larger random weights than the init, so greedy outputs vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    save_vision_processor_files(folder, default_tokenizer)
    return folder


def save_vision_processor_files(folder: str, default_tokenizer: Tokenizer) -> None:
    """The tokenizer with Qwen2-VL's vision tokens and chat template, and the preprocessor
    config (Qwen2.5-VL's are the same)."""
    import json
    import os

    from tokenizers import AddedToken

    backend = default_tokenizer.backend.__class__.from_str(default_tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (
        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")])
    assert backend.token_to_id("<|image_pad|>") == IMAGE_PAD_ID
    backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "chat_template": QWEN2_VL_CHAT_TEMPLATE}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 56 * 56,
                   "max_pixels": 28 * 28 * 1280,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}, f)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory,
                      default_tokenizer: Tokenizer) -> str:
    return build_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")), default_tokenizer)


# Qwen2.5-VL's tiny tower: windows of 84 pixels = 3 x 3 merged patches, so most test images end
# in partial windows; blocks 1 and 3 attend over whole images.
TINY_QWEN2_5_VL_VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4,
                              out_hidden_size=64, window_size=84, fullatt_block_indexes=[1, 3],
                              hidden_act="silu", in_channels=3, patch_size=14,
                              spatial_merge_size=2, temporal_patch_size=2)


def build_tiny_qwen2_5_vl(folder: str, default_tokenizer: Tokenizer) -> str:
    """A complete random-weight Qwen2.5-VL folder, as ``build_tiny_qwen2_vl``'s; norms and
    biases are random too, so that loading them is checked."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=TINY_QWEN2_VL_TEXT,
        vision_config=TINY_QWEN2_5_VL_VISION,
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():  # larger random weights than the init, so greedy outputs vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    save_vision_processor_files(folder, default_tokenizer)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory: pytest.TempPathFactory,
                        default_tokenizer: Tokenizer) -> str:
    return build_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")),
                                 default_tokenizer)
