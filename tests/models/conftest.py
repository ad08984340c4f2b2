"""Tiny random checkpoints saved by transformers itself, and greedy tokens from both engines:
the oracle of the model files' exactness tests (shapes of the real configs, widths shrunk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagedllm import LLM, SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# The heavy-chunking engine settings: 16-token steps over 8-token blocks.
CHUNKED = {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 8}


def randomize(model: Any, std: float = 0.1, vector_std: float = 0.0) -> Any:
    """Larger random weights than the init, so greedy outputs vary; ``vector_std`` also adds
    noise to 1-D parameters (norms, biases), which the init leaves constant."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
            elif vector_std:
                p.add_(torch.randn_like(p) * vector_std)
    return model.eval()


def save_checkpoint(model: Any, folder: Path, vocab: int) -> str:
    """The checkpoint (safetensors) and a word-level tokenizer ("t0".."t{vocab-1}"): prompts
    are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return str(folder)


def random_prompts(lengths: tuple[int, ...], vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(model: Any, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation of ``prompt``, MAX_TOKENS tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def pagedllm_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]
