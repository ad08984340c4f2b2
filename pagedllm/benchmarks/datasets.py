"""Benchmark prompts: vLLM-style random token prompts (``random-mm``: with random images), and
ShareGPT / JSONL prompt files.

Every dataset yields ``SampleRequest``s: the prompt text, the client's estimate of its token count,
the ``max_tokens`` to ask for and any images (data URLs). The server's own prompt count (from the
usage chunk, image tokens included) is what the report uses; ``prompt_len`` (text only) only falls
back when a server sends no usage.
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import logging
import math
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

# ShareGPT filters (vLLM's defaults): drop tiny turns and very long conversations.
_MIN_SEQ_LEN = 4
_MAX_PROMPT_LEN = 1024
_MAX_TOTAL_LEN = 2048
DEFAULT_FILE_OUTPUT_LEN = 256  # max_tokens for a file prompt that says nothing about its answer
# vLLM's random-mm default: {(height, width, num_frames): probability}; its 0-weight video bucket
# is left out (pagedllm takes images only).
DEFAULT_MM_BUCKETS = "{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}"


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
    images: tuple[str, ...] = ()  # data URLs, sent after the text as image_url parts (chat only)


def length_range(length: int, range_ratio: float, minimum: int = 0,
                 flag: str = "--random-range-ratio") -> tuple[int, int]:
    """Inclusive [floor(len*(1-r)), ceil(len*(1+r))], clamped below at ``minimum``."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"{flag} must be in [0, 1), got {range_ratio}")
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


def sample_random_mm_requests(tokenizer: TokenizerLike, num_requests: int, input_len: int,
                              output_len: int, range_ratio: float = 0.0, prefix_len: int = 0,
                              base_items_per_request: int = 1, num_items_range_ratio: float = 0.0,
                              bucket_config: str = DEFAULT_MM_BUCKETS,
                              seed: int = 0) -> list[SampleRequest]:
    """``sample_random_requests``' prompts, each with random-noise images, as vLLM's random-mm.

    A request's image count is uniform in ``length_range(base_items_per_request,
    num_items_range_ratio)``; each image's size is drawn from ``bucket_config`` (see
    ``parse_bucket_config``). Images come from their own random stream, so the text equals the
    ``random`` dataset's for the same seed. Noise costs the same tokens as a photo of its size but
    is the worst case for the encoded (PNG) size.
    """
    buckets = parse_bucket_config(bucket_config)
    if base_items_per_request < 0:
        raise ValueError(f"--random-mm-base-items-per-request must be >= 0, "
                         f"got {base_items_per_request}")
    low, high = length_range(base_items_per_request, num_items_range_ratio,
                             flag="--random-mm-num-mm-items-range-ratio")
    text = sample_random_requests(tokenizer, num_requests, input_len, output_len, range_ratio,
                                  prefix_len, seed)
    rng = np.random.default_rng([seed, 1])
    sizes, probabilities = list(buckets), list(buckets.values())
    counts = rng.integers(low, high + 1, size=num_requests).tolist()
    requests = []
    for request, count in tqdm(zip(text, counts, strict=True), total=num_requests,
                               desc="random images", disable=num_requests < 64):
        picks = rng.choice(len(sizes), size=count, p=probabilities).tolist()
        images = tuple(image_data_url(random_image(rng, *sizes[i])) for i in picks)
        requests.append(replace(request, images=images))
    return requests


def parse_bucket_config(text: str) -> dict[tuple[int, int], float]:
    """vLLM's ``--random-mm-bucket-config``, a Python-literal dict ``{(height, width,
    num_frames): probability}`` -> ``{(width, height): probability}``, normalized to sum to 1.

    Buckets of probability 0 are dropped (as vLLM drops them, so its default with a 0-weight video
    bucket is accepted); any other bucket must be an image (num_frames 1). Raises ValueError.
    """
    flag = "--random-mm-bucket-config"
    try:
        config = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"{flag} is not a Python literal: {text!r}") from None
    if not isinstance(config, dict) or not config:
        raise ValueError(f"{flag} must be a non-empty dict {{(height, width, num_frames): "
                         f"probability}}, got {text!r}")
    buckets: dict[tuple[int, int], float] = {}
    for key, probability in config.items():
        if not (isinstance(key, tuple) and len(key) == 3 and all(
                type(v) is int and v > 0 for v in key)):
            raise ValueError(f"{flag}: key {key!r} is not (height, width, num_frames) of "
                             "positive integers")
        if type(probability) not in (int, float) or not 0 <= probability < math.inf:
            raise ValueError(f"{flag}: probability {probability!r} of {key} is not a finite "
                             "number >= 0")
        if probability == 0:
            continue
        height, width, num_frames = key
        if num_frames != 1:
            raise ValueError(f"{flag}: bucket {key} has num_frames {num_frames}, but only images "
                             "(num_frames 1) are supported")
        buckets[(width, height)] = buckets.get((width, height), 0.0) + float(probability)
    total = sum(buckets.values())
    if total == 0:
        raise ValueError(f"{flag}: no bucket has a positive probability")
    return {size: p / total for size, p in buckets.items()}


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Uniform RGB noise."""
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_data_url(image: Image.Image) -> str:
    """A lossless PNG data URL (fast compression: noise does not compress anyway)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
    if args.dataset_name not in ("random", "random-mm") and not args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset_name == "random-mm":
        return sample_random_mm_requests(
            tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
            args.random_range_ratio, args.random_prefix_len,
            args.random_mm_base_items_per_request, args.random_mm_num_mm_items_range_ratio,
            args.random_mm_bucket_config, args.seed)
    if args.dataset_name == "random":
        return sample_random_requests(tokenizer, args.num_prompts, args.random_input_len,
                                      args.random_output_len, args.random_range_ratio,
                                      args.random_prefix_len, args.seed)
    return load_file_requests(args.dataset_path, tokenizer, args.num_prompts,
                              args.sharegpt_output_len, args.seed)
