"""On a GPU: pagedllm (Triton attention, CUDA graphs) against transformers on the same random
weights: token-exact greedy in float32, close logits in bfloat16. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "num_key_value_heads": 2},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
              "num_key_value_heads": 1, "head_dim": 128},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])


def random_checkpoint(folder, family: dict):
    """A 4-layer random-weight checkpoint of ``family`` (architecture, KV heads) in ``folder``,
    saved by transformers, with a placeholder tokenizer of its 1024 ids."""
    transformers = pytest.importorskip("transformers")
    config = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "vocab_size": 1024, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, **family}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits are not flat
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    from pagedllm.tokenizer import placeholder_tokenizer

    placeholder_tokenizer(config["vocab_size"]).backend.save(str(folder / "tokenizer.json"))
    return folder


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 17, 33, 64, 100, 250, 311, 7]
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    # No EOS (like ignore_eos): min_new_tokens would instead forbid EOS, changing the argmax.
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk,eager", [(None, False), (None, True), (64, False)])
def test_greedy_fp32_matches_transformers(model_dir, chunk, eager):
    import transformers

    from pagedllm import LLM, SamplingParams

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf = hf.cuda().eval()
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory_bytes=256 * 2**20,
              max_num_batched_tokens=chunk, enforce_eager=eager,
              max_num_seqs=8 if chunk else 256)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    mismatches = []
    with torch.no_grad():
        for prompt, out in zip(_prompts(), outs):
            got, want = out.outputs[0].token_ids, _hf_greedy(hf, prompt, 24)
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                mismatches.append((len(prompt), first))
    assert not mismatches, f"(prompt length, first differing output) {mismatches}"
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_bf16_logprobs_close_to_transformers(model_dir):
    import transformers

    from pagedllm import LLM, SamplingParams

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf = hf.cuda().eval()
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory_bytes=256 * 2**20)
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float().log_softmax(-1)
            got = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
            want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
            diff = max(abs(a - b) for a, b in zip(got, want))
            assert diff < 0.15, f"bf16 prompt logprobs differ by {diff}"
