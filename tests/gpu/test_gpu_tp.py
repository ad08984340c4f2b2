"""On two GPUs: tensor parallelism over NCCL, with CUDA graphs capturing the all-reduces, gives
TP=1's greedy tokens in float32 for the whole output of a short workload, and close prompt
logprobs in bfloat16. Skipped without two GPUs."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gpu_engine import _prompts, model_dir  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _generate(model_dir, tp: int, dtype: str, params, **engine_args):  # noqa: F811
    from pagedllm import LLM

    llm = LLM(str(model_dir), dtype=dtype, kv_cache_memory_bytes=256 * 2**20,
              tensor_parallel_size=tp, **engine_args)
    try:
        return llm.generate(_prompts(), params, use_tqdm=False)
    finally:
        if tp > 1:  # the workers give both GPUs back before the next engine starts
            llm.engine.client.shutdown()


@pytest.mark.parametrize("chunk", [None, 64])
def test_tp2_greedy_fp32_equals_tp1(model_dir, chunk):  # noqa: F811
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    args = {"max_num_batched_tokens": chunk, "max_num_seqs": 8 if chunk else 256}
    one = [o.outputs[0].token_ids for o in _generate(model_dir, 1, "float32", params, **args)]
    two = [o.outputs[0].token_ids for o in _generate(model_dir, 2, "float32", params, **args)]
    assert two == one


def test_tp2_bf16_logprobs_close_to_tp1(model_dir):  # noqa: F811
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def logprobs(tp: int) -> list[float]:
        return [next(iter(d.values())).logprob
                for out in _generate(model_dir, tp, "bfloat16", params)
                for d in out.prompt_logprobs[1:]]

    one, two = logprobs(1), logprobs(2)
    diff = max(abs(a - b) for a, b in zip(one, two))
    assert diff < 0.15, f"bf16 prompt logprobs of TP=2 differ from TP=1 by {diff}"
