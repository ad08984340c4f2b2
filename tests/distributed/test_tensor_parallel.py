"""Tensor parallelism on the CPU: two gloo ranks give the greedy tokens of one process, in
float32, under the engine core's regimes (defaults, heavy chunking, preemption, prefix hits),
for a Llama with grouped KV heads, one whose single KV head is replicated, and Qwen2-VL with
images. Also: two torchrun "nodes" over loopback, a worker's death, and the refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.core_client import EngineDeadError
from tests.engine.test_vision_language import IMAGE, chat_prompt, random_image
from tests.models.conftest import random_prompts, randomize, save_checkpoint

VOCAB = 250
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT_LENS = (3, 17, 40, 9, 64, 25)
# KV bytes per token of each rank at TP=2: 2 layers x (K, V) x its KV heads x 8 dims x 4 bytes
CHUNKED = {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 8}


def tiny_llama(folder: Path, num_kv_heads: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=num_kv_heads, head_dim=8,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return save_checkpoint(randomize(LlamaForCausalLM(config)), folder, VOCAB)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tp-llama"), num_kv_heads=4)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def both(model: str, prompts: list[list[int]], **engine_args) -> tuple[list, list, LLM]:
    """Greedy tokens of TP=1 (in this process) and TP=2; returns the TP=2 engine too."""
    one = greedy(LLM(model, dtype="float32", max_model_len=256, **engine_args), prompts)
    llm = LLM(model, dtype="float32", max_model_len=256, tensor_parallel_size=2, **engine_args)
    return one, greedy(llm, prompts), llm


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"


def test_defaults_and_prefix_hits(llama_dir: str) -> None:
    prompts = random_prompts(PROMPT_LENS, VOCAB)
    one, two, llm = both(llama_dir, prompts)
    assert two == one
    # Again, on the same engine: every full prompt block now comes from the prefix cache.
    assert greedy(llm, prompts) == one
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits > 0
    assert_no_leak(llm)


def test_heavy_chunking(llama_dir: str) -> None:
    prompts = random_prompts(PROMPT_LENS, VOCAB)
    one, two, llm = both(llama_dir, prompts, **CHUNKED)
    assert two == one
    assert_no_leak(llm)


def test_preemption(llama_dir: str) -> None:
    # 12 blocks of 8 tokens (one 96-token request) for 6 requests of up to 76: preemptions.
    prompts = random_prompts(PROMPT_LENS, VOCAB)
    per_token = 2 * 2 * 2 * 8 * 4  # a rank's bytes per token at TP=2 (2 of the 4 KV heads)
    args = {"block_size": 8, "enable_prefix_caching": False, "max_model_len": 96}
    one = greedy(LLM(llama_dir, dtype="float32", kv_cache_memory_bytes=12 * 8 * 2 * per_token,
                     **args), prompts)
    llm = LLM(llama_dir, dtype="float32", tensor_parallel_size=2,
              kv_cache_memory_bytes=12 * 8 * per_token, **args)
    assert greedy(llm, prompts) == one
    stats = llm.engine.get_stats()
    assert stats.num_total_blocks == 12 and stats.num_preemptions > 0
    assert_no_leak(llm)


def test_replicated_kv_head(tmp_path: Path) -> None:
    """One KV head, two ranks: each holds a copy of it (and the whole K/V slice)."""
    model = tiny_llama(tmp_path, num_kv_heads=1)
    prompts = random_prompts(PROMPT_LENS, VOCAB)
    one, two, _ = both(model, prompts, **CHUNKED)
    assert two == one


def test_four_ranks(llama_dir: str) -> None:
    """Four gloo processes (one KV head each), as the 70B runs on four GPUs split it."""
    prompts = random_prompts(PROMPT_LENS, VOCAB)
    one = greedy(LLM(llama_dir, dtype="float32", max_model_len=256, **CHUNKED), prompts)
    four = LLM(llama_dir, dtype="float32", max_model_len=256, tensor_parallel_size=4, **CHUNKED)
    assert greedy(four, prompts) == one


def test_qwen2_vl_with_images(tiny_qwen2_vl_dir: str) -> None:
    """The vision tower is replicated on both ranks; the language model is split."""
    prompts = [{"prompt": chat_prompt(f"{IMAGE}What is in this picture?"),
                "multi_modal_data": {"image": random_image(224, 224, 1)}},
               {"prompt": chat_prompt(f"Compare {IMAGE} with {IMAGE} please."),
                "multi_modal_data": {"image": [random_image(112, 140, 2),
                                               random_image(140, 112, 3)]}}]
    args = {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_bytes": 32 * 2**20,
            "max_num_batched_tokens": 48, "max_num_seqs": 4}

    def run(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    assert run(LLM(tiny_qwen2_vl_dir, tensor_parallel_size=2, **args)) == \
        run(LLM(tiny_qwen2_vl_dir, **args))


_NODE_SCRIPT = """
import json, sys
from pagedllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, tensor_parallel_size=2)
outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(sys.argv[2])],
                    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                    use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_two_torchrun_nodes_over_loopback(llama_dir: str, tmp_path: Path) -> None:
    """Two torchrun invocations, one process each, as two hosts would run them: rank 0
    serves the engine, rank 1 (the same script) becomes its worker."""
    script = tmp_path / "generate.py"
    script.write_text(_NODE_SCRIPT)
    prompts = random_prompts(PROMPT_LENS, VOCAB)
    port = 29500 + os.getpid() % 1000
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port",
         str(port), str(script), llama_dir, json.dumps(prompts)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("TOKENS"))
    assert json.loads(line.removeprefix("TOKENS ")) == \
        greedy(LLM(llama_dir, dtype="float32", max_model_len=256), prompts)
    assert "TOKENS" not in outputs[1]  # the worker never ran the rest of the script


def test_dead_worker_ends_the_engine(llama_dir: str) -> None:
    llm = LLM(llama_dir, dtype="float32", max_model_len=256, tensor_parallel_size=2)
    core = llm.engine.client.proc.pid
    (worker,) = Path(f"/proc/{core}/task/{core}/children").read_text().split()
    os.kill(int(worker), signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        greedy(llm, random_prompts((8,), VOCAB))
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("tp, message", [
    (3, r"attention heads \(num_attention_heads\) \(8\) must be divisible by tensor parallel "
        r"size \(3\)"),
])
def test_refuses_what_does_not_split(llama_dir: str, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(llama_dir, tensor_parallel_size=tp)


def test_refuses_more_ranks_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pagedllm.distributed import launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\) is larger than the "
                                         r"number of GPUs on this host \(1\)"):
        launch.check_devices({"device": "cuda"}, 2)
