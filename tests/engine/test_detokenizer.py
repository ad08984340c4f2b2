"""IncrementalDetokenizer: streamed text equals the full decode; stop strings are cut exactly."""

from __future__ import annotations

import random

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer

MULTIBYTE = [
    "Hi 😀 你好世界! 👍🏽 🇫🇷 done",
    "家族: 👨‍👩‍👧‍👦, 日本語のテキスト、한국어",
    "∑ x² ≤ ∞ — “quotes” and ‘more’ ✓",
]


def _stream(tok: Tokenizer, ids: list[int], params: SamplingParams, prompt: list[int] | None = None,
            ) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feeds ids one at a time like the engine, collecting deltas until a stop string."""
    detok = IncrementalDetokenizer(tok, prompt or [], params)
    deltas: list[str] = []
    stop = None
    for token_id in ids:
        stop = detok.update([token_id], stop_checking=True)
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            break
    if stop is None:
        deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return detok, deltas, stop


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_of_multibyte_text_equals_full_decode(default_tokenizer: Tokenizer,
                                                     text: str) -> None:
    ids = default_tokenizer.encode(text)
    prompt = default_tokenizer.encode("<|im_start|>assistant\n")
    detok, deltas, stop = _stream(default_tokenizer, ids, SamplingParams(), prompt)
    assert stop is None
    assert "".join(deltas) == default_tokenizer.decode(ids) == text
    assert detok.output_text == text
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) > 5  # really streamed, not all at the end


def test_cumulative_text_is_always_a_prefix(default_tokenizer: Tokenizer) -> None:
    text = MULTIBYTE[0]
    ids = default_tokenizer.encode(text)
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams())
    seen = ""
    for token_id in ids:
        detok.update([token_id], stop_checking=True)
        full = detok.get_next_output_text(finished=False, delta=False)
        assert full.startswith(seen) and text.startswith(full)
        seen = full
    assert detok.get_next_output_text(finished=True, delta=False) == text


def test_decode_window_stays_small(default_tokenizer: Tokenizer,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ids = default_tokenizer.encode(" ".join(["streaming text 😀 中文"] * 40))
    sizes: list[int] = []
    real = default_tokenizer.decode

    def spy(token_ids: list[int], *args: object, **kwargs: object) -> str:
        sizes.append(len(token_ids))
        return real(token_ids, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(default_tokenizer, "decode", spy)
    prompt = list(range(100, 1100))  # a long prompt is not re-decoded either
    _stream(default_tokenizer, ids, SamplingParams(), prompt)
    assert len(ids) > 200
    assert max(sizes) <= 8


def test_all_tokens_in_one_update(default_tokenizer: Tokenizer) -> None:
    text = MULTIBYTE[1]
    ids = default_tokenizer.encode(text)
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams())
    assert detok.update(ids, stop_checking=True) is None
    assert detok.get_next_output_text(finished=False, delta=True) == text


@pytest.mark.parametrize("stop", ["世界!", "o wor", "😀 你"])
def test_stop_string_across_token_boundaries_is_cut(default_tokenizer: Tokenizer,
                                                    stop: str) -> None:
    text = "Hello world 😀 你好世界! and more text after"
    ids = default_tokenizer.encode(text)
    detok, deltas, found = _stream(default_tokenizer, ids, SamplingParams(stop=[stop]))
    expected = text[:text.index(stop)]
    assert found == stop
    assert detok.output_text == expected
    assert "".join(deltas) == expected


def test_include_stop_str_in_output(default_tokenizer: Tokenizer) -> None:
    text = "one two three four five"
    ids = default_tokenizer.encode(text)
    params = SamplingParams(stop=["hree f"], include_stop_str_in_output=True)
    detok, deltas, found = _stream(default_tokenizer, ids, params)
    assert found == "hree f"
    assert detok.output_text == "one two three f"
    assert "".join(deltas) == "one two three f"


def test_earliest_stop_string_wins(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("alpha beta gamma")
    detok = IncrementalDetokenizer(default_tokenizer, [],
                                   SamplingParams(stop=["gamma", "beta", "zzz"]))
    assert detok.update(ids, stop_checking=True) == "beta"
    assert detok.output_text == "alpha "
    assert detok.update(default_tokenizer.encode(" more"), stop_checking=True) is None
    assert detok.output_text == "alpha "


def test_text_is_held_back_by_longest_stop_minus_one(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("The quick brown fox")
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams(stop=["ab", "XYZW"]))
    assert detok.update(ids, stop_checking=True) is None
    # "XYZW" is longest: its first 3 characters could be at the end, so " fox"[-3:] waits.
    assert detok.get_next_output_text(finished=False, delta=False) == "The quick brown "
    assert detok.get_next_output_text(finished=False, delta=True) == "The quick brown "
    assert detok.get_next_output_text(finished=False, delta=True) == ""
    assert detok.get_next_output_text(finished=True, delta=True) == "fox"
    assert detok.get_next_output_text(finished=True, delta=False) == "The quick brown fox"


def test_no_hold_back_without_stop_strings_or_when_including_them(
        default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("The quick brown fox")
    including = SamplingParams(stop=["XYZW"], include_stop_str_in_output=True)
    for params in (SamplingParams(), including):
        detok = IncrementalDetokenizer(default_tokenizer, [], params)
        detok.update(ids, stop_checking=True)
        assert detok.get_next_output_text(finished=False, delta=True) == "The quick brown fox"


def test_stop_checking_off_ignores_stop_strings(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("alpha beta gamma")
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams(stop=["beta"]))
    assert detok.update(ids, stop_checking=False) is None  # e.g. before min_tokens
    assert detok.output_text == "alpha beta gamma"


def test_special_tokens_skipped_or_kept(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("Sure.<|im_end|>")
    skipped = IncrementalDetokenizer(default_tokenizer, [], SamplingParams())
    skipped.update(ids, stop_checking=True)
    assert skipped.get_next_output_text(finished=True, delta=False) == "Sure."
    kept = IncrementalDetokenizer(default_tokenizer, [], SamplingParams(
        skip_special_tokens=False, spaces_between_special_tokens=False))
    kept.update(ids, stop_checking=True)
    assert kept.get_next_output_text(finished=True, delta=False) == "Sure.<|im_end|>"
    spaced = IncrementalDetokenizer(default_tokenizer, [], SamplingParams(
        skip_special_tokens=False, spaces_between_special_tokens=True))
    spaced.update(ids, stop_checking=True)
    assert spaced.get_next_output_text(finished=True, delta=False) == "Sure. <|im_end|>"


def test_unfinished_character_is_flushed_when_the_request_ends(
        default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("ok 😀")
    partial = ids[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams())
    detok.update(partial, stop_checking=True)
    streamed = detok.get_next_output_text(finished=False, delta=True)
    assert "\ufffd" not in streamed
    final = streamed + detok.get_next_output_text(finished=True, delta=True)
    assert final == default_tokenizer.decode(partial)
    assert final.endswith("\ufffd")


def _metaspace_tokenizer() -> Tokenizer:
    """A sentencepiece-style vocabulary: the decoder drops the space of the first token."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "!": 3}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return Tokenizer(backend, bos_token_id=None, eos_token_id=None)


def test_leading_space_comes_from_prompt_context() -> None:
    tok = _metaspace_tokenizer()
    assert tok.decode([2]) == "world"  # decoded alone, the space is lost
    detok, deltas, _ = _stream(tok, [2, 3], SamplingParams(), prompt=[1])
    assert "".join(deltas) == detok.output_text == " world!"
    detok, deltas, _ = _stream(tok, [1, 2, 3], SamplingParams(), prompt=[])
    assert "".join(deltas) == tok.decode([1, 2, 3]) == "Hello world!"


def test_decode_token(default_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams())
    hello = default_tokenizer.encode(" Hello")
    assert len(hello) == 1 and detok.decode_token(hello[0]) == " Hello"
    assert detok.decode_token(2) == "<|im_end|>"


@pytest.mark.parametrize(("skip", "spaces"), [(True, True), (False, False), (False, True)])
def test_byte_level_shortcut_equals_decoding_the_window(default_tokenizer: Tokenizer,
                                                        skip: bool, spaces: bool) -> None:
    """Byte-level tokenizers skip decoding a window of two whole-character tokens (their
    cached texts are joined, or the new one's taken as is: ``_plain_text``); random ids, special
    tokens and split characters included, give the same deltas as decoding every window."""
    rng = random.Random(0)
    text_ids = default_tokenizer.encode("".join(MULTIBYTE) + " plain words, 1234!")
    vocab = default_tokenizer.vocab_size
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    shared: dict[int, str] = {}
    for _ in range(40):
        ids = [rng.choice([rng.randrange(vocab), rng.randrange(20), rng.choice(text_ids)])
               for _ in range(30)]
        prompt = [rng.randrange(vocab) for _ in range(3)]
        fast = IncrementalDetokenizer(default_tokenizer, prompt, params, shared)
        slow = IncrementalDetokenizer(default_tokenizer, prompt, params)
        assert fast._byte_level == (skip or not spaces)
        slow._byte_level = False
        for token_id in ids:
            fast.update([token_id], stop_checking=True)
            slow.update([token_id], stop_checking=True)
            assert fast.get_next_output_text(False, True) == slow.get_next_output_text(False, True)
        assert fast.get_next_output_text(True, False) == slow.get_next_output_text(True, False)
