"""Random (text and random-mm) and file datasets for bench serve."""

import argparse
import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pagedllm.benchmarks.datasets import (
    DEFAULT_FILE_OUTPUT_LEN,
    DEFAULT_MM_BUCKETS,
    build_requests,
    length_range,
    load_file_requests,
    parse_bucket_config,
    sample_random_mm_requests,
    sample_random_requests,
)


def test_length_range() -> None:
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(3, 0.5, minimum=1) == (1, 5)  # floor 1.5, ceil 4.5
    assert length_range(1, 0.9, minimum=1) == (1, 2)
    with pytest.raises(ValueError):
        length_range(10, 1.0)


def test_random_prompts_encode_to_their_drawn_lengths(tokenizer) -> None:
    reqs = sample_random_requests(tokenizer, 50, input_len=40, output_len=20, range_ratio=0.5,
                                  seed=1)
    lens = [len(tokenizer.encode(r.prompt)) - 1 for r in reqs]  # minus the BOS
    assert all(20 <= n <= 60 for n in lens) and len(set(lens)) > 5
    assert all(r.prompt_len == len(tokenizer.encode(r.prompt)) for r in reqs)
    outs = [r.expected_output_len for r in reqs]
    assert all(10 <= n <= 30 for n in outs) and len(set(outs)) > 5


def test_random_prompts_share_a_prefix(tokenizer) -> None:
    reqs = sample_random_requests(tokenizer, 10, input_len=8, output_len=4, prefix_len=16,
                                  seed=3)
    prefixes = {tuple(tokenizer.encode(r.prompt)[1:17]) for r in reqs}
    assert len(prefixes) == 1
    assert all(r.prompt_len == 1 + 16 + 8 for r in reqs)
    assert len({r.prompt for r in reqs}) == 10  # the rest differs
    assert all(0 not in tokenizer.encode(r.prompt)[1:] for r in reqs)  # no special ids inside


def test_random_is_seeded(tokenizer) -> None:
    def make(seed: int) -> list[str]:
        return [r.prompt for r in sample_random_requests(tokenizer, 5, 10, 5, seed=seed)]

    assert make(7) == make(7)
    assert make(7) != make(8)


class PairTokenizer:
    """Re-tokenization that merges: ids decode to 1 or 2 letters, encode takes 2 letters at a
    time, so decoded random ids do not encode back to the same count."""

    pieces = ["a", "b", "c"] + [x + y for x in "abc" for y in "abc"]
    vocab_size = len(pieces) + 1
    all_special_ids = [0]

    def encode(self, text: str) -> list[int]:
        return [1 + self.pieces.index(text[i:i + 2]) for i in range(0, len(text), 2)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i - 1] for i in ids if i)


def test_random_prompts_are_corrected_for_retokenization() -> None:
    tok = PairTokenizer()
    reqs = sample_random_requests(tok, 40, input_len=30, output_len=5, range_ratio=0.3,
                                  prefix_len=6, seed=0)
    drawn = sample_random_requests(PairTokenizer(), 40, input_len=30, output_len=5,
                                   range_ratio=0.3, seed=0)  # the same length draws, no prefix
    prefixes = {tok.encode(r.prompt)[:5] == tok.encode(reqs[0].prompt)[:5] for r in reqs}
    assert prefixes == {True}
    for r, d in zip(reqs, drawn, strict=True):
        assert r.prompt_len == len(tok.encode(r.prompt))
        assert abs(r.prompt_len - (6 + d.prompt_len)) <= 1  # merges at the seam: rarely off
    exact = sum(r.prompt_len == 6 + d.prompt_len for r, d in zip(reqs, drawn, strict=True))
    assert exact >= 36


def _write_sharegpt(path: Path) -> None:
    def conv(human: str, gpt: str) -> dict:
        return {"conversations": [{"from": "human", "value": human},
                                  {"from": "gpt", "value": gpt}]}

    records = [conv("one two three four five", "a b c d e f"),
               conv("tiny", "a b c d e"),  # prompt under 4 tokens (with BOS: 2): dropped
               conv("w1 w2 w3 w4", "x y"),  # answer under 4 tokens: dropped unless fixed
               {"conversations": [{"from": "human", "value": "alone"}]}]  # no answer: dropped
    path.write_text(json.dumps(records))


def test_sharegpt_json(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path)
    reqs = load_file_requests(path, tokenizer, num_requests=1)
    assert [(r.prompt, r.prompt_len, r.expected_output_len) for r in reqs] == [
        ("one two three four five", 6, 7)]  # 6 answer words + BOS
    fixed = load_file_requests(path, tokenizer, num_requests=2, output_len=16)
    assert {r.prompt for r in fixed} == {"one two three four five", "w1 w2 w3 w4"}
    assert {r.expected_output_len for r in fixed} == {16}


def test_too_few_records_are_cycled(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path)
    reqs = load_file_requests(path, tokenizer, num_requests=3)
    assert [r.prompt for r in reqs] == ["one two three four five"] * 3


def test_jsonl_prompts(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello there", "output_len": 9},
             {"prompt": "count my answer", "completion": "one two"},
             {"prompt": "no length given"},
             {"prompt": ""},  # skipped
             {"conversations": [{"role": "user", "content": "p q r s"},
                                {"role": "assistant", "content": "1 2 3 4 5"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    reqs = load_file_requests(path, tokenizer, num_requests=4, seed=5)
    got = {r.prompt: (r.prompt_len, r.expected_output_len) for r in reqs}
    assert got == {"hello there": (3, 9), "count my answer": (4, 3),
                   "no length given": (4, DEFAULT_FILE_OUTPUT_LEN), "p q r s": (5, 6)}


def test_file_errors(tmp_path: Path, tokenizer) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match="no usable prompts"):
        load_file_requests(empty, tokenizer, 1)
    with pytest.raises(ValueError, match="JSON objects"):
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2]")
        load_file_requests(bad, tokenizer, 1)


def _decode(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_random_mm_requests_carry_images_of_the_drawn_sizes(tokenizer) -> None:
    buckets = "{(28, 56, 1): 3, (40, 30, 1): 1, (720, 1280, 16): 0.0}"  # (height, width, frames)
    reqs = sample_random_mm_requests(tokenizer, 40, input_len=12, output_len=5,
                                     base_items_per_request=2, num_items_range_ratio=0.5,
                                     bucket_config=buckets, seed=4)
    counts = [len(r.images) for r in reqs]
    assert set(counts) == {1, 2, 3}  # [floor(2 * 0.5), ceil(2 * 1.5)]
    images = [_decode(url) for r in reqs for url in r.images]
    sizes = [image.size for image in images]  # (width, height)
    assert set(sizes) == {(56, 28), (30, 40)}
    assert 0.6 < sizes.count((56, 28)) / len(sizes) < 0.9  # probability 3/4
    assert all(image.mode == "RGB" for image in images)
    assert len({image.tobytes() for image in images}) == len(images)  # fresh noise each
    # The text is the random dataset's for the same seed; images come from their own stream.
    text = sample_random_requests(tokenizer, 40, input_len=12, output_len=5, seed=4)
    assert [(r.prompt, r.prompt_len, r.expected_output_len) for r in reqs] == [
        (t.prompt, t.prompt_len, t.expected_output_len) for t in text]


def test_random_mm_is_seeded(tokenizer) -> None:
    def make(seed: int) -> list[tuple[str, ...]]:
        return [r.images for r in sample_random_mm_requests(
            tokenizer, 3, 4, 2, bucket_config="{(16, 16, 1): 1.0}", seed=seed)]

    assert make(1) == make(1)
    assert make(1) != make(2)
    assert all(len(images) == 1 for images in make(1))  # base 1, no range: exactly one each


def test_bucket_config_is_normalized_and_images_only() -> None:
    assert parse_bucket_config(DEFAULT_MM_BUCKETS) == {(256, 256): 0.5, (1280, 720): 0.5}
    assert parse_bucket_config("{(224, 224, 1): 2, (720, 1280, 16): 0.0}") == {(224, 224): 1.0}
    bad = {
        "{(224, 224, 1): 1.0": "not a Python literal",
        "[(224, 224, 1)]": "non-empty dict",
        "{}": "non-empty dict",
        "{(224, 224): 1.0}": "height, width, num_frames",
        "{(0, 224, 1): 1.0}": "height, width, num_frames",
        "{(224, 224, 1.0): 1.0}": "height, width, num_frames",
        "{(224, 224, 8): 0.5}": "only images",
        "{(224, 224, 1): -1}": "finite number >= 0",
        "{(224, 224, 1): 1e999}": "finite number >= 0",  # inf
        "{(224, 224, 1): True}": "finite number >= 0",
        "{(224, 224, 1): 0}": "no bucket has a positive probability",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_bucket_config(text)


def test_random_mm_rejects_bad_item_counts(tokenizer) -> None:
    with pytest.raises(ValueError, match="base-items-per-request"):
        sample_random_mm_requests(tokenizer, 2, 4, 2, base_items_per_request=-1)
    with pytest.raises(ValueError, match="num-mm-items-range-ratio"):
        sample_random_mm_requests(tokenizer, 2, 4, 2, num_items_range_ratio=1.5)


def test_build_requests_random_mm(tokenizer, monkeypatch) -> None:
    from pagedllm.benchmarks import datasets

    monkeypatch.setattr(datasets, "load_tokenizer", lambda path: tokenizer)
    args = argparse.Namespace(
        dataset_name="random-mm", dataset_path=None, tokenizer=None, num_prompts=3,
        random_input_len=6, random_output_len=4, random_range_ratio=0.0, random_prefix_len=0,
        random_mm_base_items_per_request=2, random_mm_num_mm_items_range_ratio=0.0,
        random_mm_bucket_config="{(32, 48, 1): 1.0}", seed=0)
    reqs = build_requests(args)
    assert [len(r.images) for r in reqs] == [2, 2, 2]
    assert {_decode(url).size for r in reqs for url in r.images} == {(48, 32)}
