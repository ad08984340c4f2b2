"""``LLM.generate(..., priority=[...])`` (vLLM's signature: one priority per prompt)."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.llm import LLM
from pagedllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=256 * 2**20, max_model_len=256, max_num_seqs=1,
               scheduling_policy="priority")


def test_the_lowest_priority_value_is_scheduled_first(llm: LLM) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompts = ["First prompt", "Second prompt", "Third prompt"]
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[5, -1, 2])
    assert [o.prompt for o in outs] == prompts  # outputs in input order
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    started = [o.metrics.first_scheduled_time for o in outs]
    assert started[1] < started[2] < started[0]  # one at a time: by priority


def test_one_priority_per_prompt(llm: LLM) -> None:
    with pytest.raises(ValueError, match="lengths of prompts"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[1])
