"""The peer's benchmark (../shared/peer/vllm_bench.py) with extra ``LLM(...)`` options, e.g. vLLM's
FP8 runs for issue 16. Run on the GPU machine after the peer's two set-up calls:

    PEER_LLM_KWARGS='{"quantization": "fp8"}' PYTHONPATH=/root/peer/site \\
        python3 benchmarks/vllm_peer_options.py . --only llama-3.1-8b llama-3.1-8b-b1

Every argument goes to vllm_bench.py unchanged; the JSON object in ``PEER_LLM_KWARGS`` is added
to the keyword arguments vllm_bench gives ``vllm.LLM`` (in each job's own process: the jobs are
started through this file, which the environment variable reaches).
"""

from __future__ import annotations

import json
import os
import sys

PEER = os.environ.get("PEER_BENCH_DIR", os.path.join(os.getcwd(), ".peer", "part2"))
sys.path.insert(0, PEER)
import vllm_bench  # noqa: E402

_make_llm = vllm_bench.make_llm


def make_llm(repo: str, config: str, max_num_seqs: int, args):  # noqa: ANN001, ANN201
    """vllm_bench.make_llm with PEER_LLM_KWARGS added to vllm.LLM's arguments."""
    import vllm

    extra = json.loads(os.environ.get("PEER_LLM_KWARGS", "{}"))
    real_llm = vllm.LLM
    vllm.LLM = lambda **kwargs: real_llm(**kwargs, **extra)
    try:
        return _make_llm(repo, config, max_num_seqs, args)
    finally:
        vllm.LLM = real_llm


vllm_bench.make_llm = make_llm
vllm_bench.__file__ = os.path.abspath(__file__)  # the jobs' processes start here too

if __name__ == "__main__":
    sys.exit(vllm_bench.main())
