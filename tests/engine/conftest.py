"""The transformers oracle on the default model (float32), loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm.models.loader import ModelSource

LONG_TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines "
    "were programmed by rewiring panels; stored programs replaced the wires, assemblers replaced "
    "the numbers, compilers replaced the assembly, and operating systems hid the hardware behind "
    "files and processes. Each layer let more people build more ambitious things, and each layer "
    "cost some efficiency that the next generation of hardware paid back. ") * 5

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Write a haiku about the sea.",
    LONG_TEXT + "\nSummarize the paragraph above in one sentence:",
    "1, 2, 3, 4, 5,",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who",
]


@pytest.fixture(scope="session")
def hf_model(default_source: ModelSource):
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(default_source.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32)
    return model.eval()


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate for one prompt (no padding), new tokens only."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=None,
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=hf_model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()
