"""Benchmark prompts: vLLM-style random token prompts, and ShareGPT / JSONL prompt files.

Every dataset yields ``SampleRequest``s: the prompt text, the client's estimate of its token count
and the ``max_tokens`` to ask for. The server's own prompt count (from the usage chunk) is what the
report uses; ``prompt_len`` only falls back when a server sends no usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

# ShareGPT filters (vLLM's defaults): drop tiny turns and very long conversations.
_MIN_SEQ_LEN = 4
_MAX_PROMPT_LEN = 1024
_MAX_TOTAL_LEN = 2048
DEFAULT_FILE_OUTPUT_LEN = 256  # max_tokens for a file prompt that says nothing about its answer


class TokenizerLike(Protocol):
    """What the datasets need from a tokenizer (pagedllm.tokenizer's interface)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> Collection[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens by the client's tokenizer; the server's usage count wins
    expected_output_len: int  # sent as max_tokens


def length_range(length: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    """Inclusive [floor(len*(1-r)), ceil(len*(1+r))], clamped below at ``minimum``."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(minimum, math.floor(length * (1.0 - range_ratio)))
    high = max(low, math.ceil(length * (1.0 + range_ratio)))
    return low, high


def sample_random_requests(tokenizer: TokenizerLike, num_requests: int, input_len: int,
                           output_len: int, range_ratio: float = 0.0, prefix_len: int = 0,
                           seed: int = 0) -> list[SampleRequest]:
    """Prompts of random token ids decoded to text, after a shared random prefix.

    Each prompt's length (prefix excluded) is uniform in ``length_range(input_len, ratio)``; each
    ``max_tokens`` likewise from ``output_len`` (at least 1). Decoded text re-tokenizes to other
    ids, so the body is trimmed or extended until the whole prompt encodes to its target length.
    """
    if input_len < 0 or output_len < 1 or prefix_len < 0 or num_requests < 1:
        raise ValueError("need --random-input-len >= 0, --random-output-len >= 1, "
                         "--random-prefix-len >= 0 and --num-prompts >= 1")
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    in_low, in_high = length_range(input_len, range_ratio, minimum=0 if prefix_len else 1)
    out_low, out_high = length_range(output_len, range_ratio, minimum=1)
    input_lens = rng.integers(in_low, in_high + 1, size=num_requests)
    output_lens = rng.integers(out_low, out_high + 1, size=num_requests)
    prefix_text = _fit_text(tokenizer, rng, allowed, special, "", prefix_len)
    prefix_tokens = len(_body(tokenizer, prefix_text, special))
    requests = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        prompt = _fit_text(tokenizer, rng, allowed, special, prefix_text, prefix_tokens + n_in)
        requests.append(SampleRequest(prompt, len(tokenizer.encode(prompt)), n_out))
    return requests


def _body(tokenizer: TokenizerLike, text: str, special: set[int]) -> list[int]:
    return [t for t in tokenizer.encode(text) if t not in special]


def _fit_text(tokenizer: TokenizerLike, rng: np.random.Generator, allowed: np.ndarray,
              special: set[int], head: str, target: int) -> str:
    """head + decoded random ids, adjusted until it encodes to ``target`` non-special tokens."""
    if target <= 0:
        return head
    ids = rng.choice(allowed, size=max(0, target - len(_body(tokenizer, head, special)))).tolist()
    text = head
    for _ in range(10):  # usually 1-3 rounds; token merges at the seams need the rest
        text = head + tokenizer.decode(ids)
        n_tokens = len(_body(tokenizer, text, special))
        if n_tokens == target:
            break
        if n_tokens > target:
            ids = ids[: max(0, len(ids) - (n_tokens - target))]
        else:
            ids = ids + rng.choice(allowed, size=target - n_tokens).tolist()
    return text


def load_file_requests(path: str | Path, tokenizer: TokenizerLike, num_requests: int,
                       output_len: int | None = None, seed: int = 0) -> list[SampleRequest]:
    """``num_requests`` prompts from a ShareGPT JSON file or a JSONL file, shuffled by ``seed``.

    ShareGPT records (``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt",
    ...}]}``) give the first human turn as the prompt and the first reply's token count as
    ``max_tokens``; JSONL lines are ShareGPT records or ``{"prompt": ..., "output_len": N}``
    (``max_tokens`` and ``completion`` are read too). ``output_len`` overrides every record's.
    Too few usable records are cycled, with a warning.
    """
    records = _read_records(Path(path))
    random.Random(seed).shuffle(records)
    requests: list[SampleRequest] = []
    for record in records:
        sample = _record_to_request(record, tokenizer, output_len)
        if sample is not None:
            requests.append(sample)
            if len(requests) == num_requests:
                return requests
    if not requests:
        raise ValueError(f"{path}: no usable prompts")
    logger.warning("%s has %d usable prompts; repeating them to make %d", path, len(requests),
                   num_requests)
    return [requests[i % len(requests)] for i in range(num_requests)]


def _read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(stripped)
    else:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected JSON objects (ShareGPT records or JSONL lines)")
    return data


def _record_to_request(record: dict[str, Any], tokenizer: TokenizerLike,
                       output_len: int | None) -> SampleRequest | None:
    if "conversations" in record:
        turns = list(_turns(record["conversations"]))
        if len(turns) < 2:
            return None
        prompt, completion = turns[0], turns[1]
        prompt_len = len(tokenizer.encode(prompt))
        n_out = output_len if output_len is not None else len(tokenizer.encode(completion))
        if not _valid_sharegpt(prompt_len, n_out, check_output=output_len is None):
            return None
        return SampleRequest(prompt, prompt_len, n_out)
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return None
    n_out = output_len or _record_output_len(record, tokenizer)
    return SampleRequest(prompt, len(tokenizer.encode(prompt)), max(1, n_out))


def _turns(conversation: Sequence[dict[str, Any]]) -> Iterator[str]:
    for turn in conversation:
        value = turn.get("value", turn.get("content"))
        if isinstance(value, str):
            yield value


def _record_output_len(record: dict[str, Any], tokenizer: TokenizerLike) -> int:
    for key in ("output_len", "max_tokens"):
        if isinstance(record.get(key), int):
            return int(record[key])
    for key in ("completion", "output"):
        if isinstance(record.get(key), str):
            return len(tokenizer.encode(record[key]))
    return DEFAULT_FILE_OUTPUT_LEN


def _valid_sharegpt(prompt_len: int, output_len: int, check_output: bool) -> bool:
    if prompt_len < _MIN_SEQ_LEN or (check_output and output_len < _MIN_SEQ_LEN):
        return False
    return prompt_len <= _MAX_PROMPT_LEN and prompt_len + output_len <= _MAX_TOTAL_LEN


def load_tokenizer(path: str | None) -> TokenizerLike:
    """pagedllm's tokenizer for ``path`` (None: the default model), imported only here."""
    from pagedllm.models.loader.source import resolve_model
    from pagedllm.tokenizer import load_tokenizer as load

    return load(resolve_model(path))


def build_requests(args: argparse.Namespace) -> list[SampleRequest]:
    """The prompts that bench serve's dataset flags describe."""
    if args.dataset_name != "random" and not args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset_name == "random":
        return sample_random_requests(tokenizer, args.num_prompts, args.random_input_len,
                                      args.random_output_len, args.random_range_ratio,
                                      args.random_prefix_len, args.seed)
    return load_file_requests(args.dataset_path, tokenizer, args.num_prompts,
                              args.sharegpt_output_len, args.seed)
