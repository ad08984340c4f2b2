"""Tokenizer: encodings, decodes and chat templates equal transformers' for the default model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pagedllm.models.loader import ModelSource, resolve_model
from pagedllm.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>pagedllm<file_sep>x",
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "a   b\t\tc\n\n\n  d    \n",
    "12345 3.14159 1,000,000 2024-11-24 0x1F",
    "  leading and trailing  ",
    "it's I'm we'll they've you'd SHE'S",
    "café naïve Ångström résumé",
    "def f(x):\n    return x ** 2  # square\n",
    "",
    " ",
    "<|im_start|",  # almost a special token: ordinary text
]

MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 😀"},
     {"role": "user", "content": "中文?"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(default_source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_source.path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_transformers(default_tokenizer: Tokenizer, hf_tokenizer: Any,
                                    text: str) -> None:
    assert default_tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    assert (default_tokenizer.encode(text, add_special_tokens=False)
            == hf_tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", TEXTS)
def test_decode_equals_transformers_and_round_trips(default_tokenizer: Tokenizer,
                                                    hf_tokenizer: Any, text: str) -> None:
    ids = default_tokenizer.encode(text)
    assert default_tokenizer.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert (default_tokenizer.decode(ids, skip_special_tokens=skip)
                == hf_tokenizer.decode(ids, skip_special_tokens=skip))
    assert default_tokenizer.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)


def test_special_tokens_and_sizes(default_tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    tok = default_tokenizer
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert tok.eos_token == "<|im_end|>"
    assert set(hf_tokenizer.all_special_ids) <= tok.all_special_ids
    assert tok.all_special_ids == set(range(17))  # every control token of the vocabulary
    # add_bos_token is False in this file: no BOS is prepended.
    assert tok.encode("<|im_start|>hi") == [1, *tok.encode("hi")]
    assert tok.encode("hi")[0] != tok.bos_token_id


def test_spaces_between_special_tokens(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    spaced = default_tokenizer.decode(ids, skip_special_tokens=False,
                                      spaces_between_special_tokens=True)
    assert spaced == "<|im_start|> user\nHi <|im_end|>"
    assert default_tokenizer.decode(ids, skip_special_tokens=True,
                                    spaces_between_special_tokens=True) == "user\nHi"


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(default_tokenizer: Tokenizer, hf_tokenizer: Any,
                                           messages: list[dict[str, Any]],
                                           add_generation_prompt: bool) -> None:
    ours = default_tokenizer.apply_chat_template(messages,
                                                 add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_override_inline_and_file(default_source: ModelSource,
                                                tmp_path: Path) -> None:
    inline = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tok = load_tokenizer(default_source, chat_template=inline)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"
    file = tmp_path / "t.jinja"
    file.write_text("{{ bos_token }}{{ messages | length }}{{ raise_exception('no') "
                    "if messages | length > 1 }}{{ strftime_now('%Y') | length }}")
    tok = load_tokenizer(default_source, chat_template=str(file))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>14"
    with pytest.raises(Exception, match="no"):
        tok.apply_chat_template([{"role": "user", "content": "x"}] * 2)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(default_source, chat_template=str(tmp_path / "missing.jinja"))


def test_template_tojson_keeps_unicode(default_source: ModelSource) -> None:
    tok = load_tokenizer(default_source, chat_template="{{ tools | tojson }}")
    rendered = tok.apply_chat_template([], tools=[{"name": "météo", "desc": "<b>"}])
    assert json.loads(rendered) == [{"name": "météo", "desc": "<b>"}]
    assert "météo" in rendered and "<b>" in rendered


def test_hf_folder_tokenizer_matches_gguf(default_tokenizer: Tokenizer, hf_tokenizer: Any,
                                          tmp_path: Path) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(resolve_model(str(tmp_path)))
    for text in TEXTS:
        assert tok.encode(text) == default_tokenizer.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.chat_template == default_tokenizer.chat_template
    assert tok.apply_chat_template(MESSAGES[2]) == default_tokenizer.apply_chat_template(
        MESSAGES[2])


def test_hf_folder_add_bos_and_named_templates(hf_tokenizer: Any, tmp_path: Path) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    for extra in ("chat_template.jinja", "chat_template.json"):
        if (tmp_path / extra).exists():
            (tmp_path / extra).unlink()
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=True, bos_token={"content": "<|endoftext|>"},
                  chat_template=[{"name": "tool_use", "template": "T"},
                                 {"name": "default", "template": "D"}])
    config_path.write_text(json.dumps(config))
    tok = load_tokenizer(resolve_model(str(tmp_path)))
    assert tok.bos_token_id == 0
    assert tok.encode("hi") == [0, *tok.encode("hi", add_special_tokens=False)]
    assert tok.chat_template == "D"
