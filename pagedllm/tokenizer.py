"""Tokenizer: text <-> token ids and chat templates, built from a GGUF file or an HF folder.

Wraps a ``tokenizers.Tokenizer`` (the Rust one; transformers is not needed at run time). For a
GGUF file the byte-level BPE is rebuilt from the ``tokenizer.ggml.*`` metadata so that encodings
equal transformers' GGUF conversion of the same file.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

if TYPE_CHECKING:
    from pagedllm.models.loader.source import ModelSource

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# tokenizer.ggml.pre -> the split regex the vocabulary was trained with; any other value (gpt2,
# smollm, ...) uses the GPT-2 regex built into ByteLevel, as transformers' GGUF conversion does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


class Tokenizer:
    """Encode, decode and chat-template rendering for one model."""

    def __init__(self, backend: BackendTokenizer, *, bos_token_id: int | None,
                 eos_token_id: int | None, add_bos: bool = False,
                 chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {i for i, t in added.items() if t.special}
        self.all_special_ids |= {i for i in (bos_token_id, eos_token_id) if i is not None}
        # Prepend BOS ourselves only when the backend's post-processor does not already.
        self._prepend_bos = (add_bos and bos_token_id is not None
                             and backend.encode("a").ids[:1] != [bos_token_id])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raises ValueError for text that is not valid Unicode (a lone surrogate, which JSON's
        ``\\ud800`` escapes can carry): a client's mistake, not a server failure."""
        try:
            # encode_batch releases the GIL while it works (encode does not): a 5 MB prompt
            # must not stall the server's other threads for seconds.
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except TypeError:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"The text is not valid Unicode: {e.object[e.start]!r} at "
                                 f"position {e.start} is a lone surrogate.") from None
            raise
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = False) -> str:
        """Text of ``ids``. With ``spaces_between_special_tokens`` (and special tokens kept), each
        special token is set off from its neighbours by one space."""
        if skip_special_tokens or not spaces_between_special_tokens:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self.all_special_ids:
                if run:
                    pieces.append(self.backend.decode(run, skip_special_tokens=False))
                    run = []
                pieces.append(self.backend.id_to_token(token_id) or "")
            else:
                run.append(token_id)
        if run:
            pieces.append(self.backend.decode(run, skip_special_tokens=False))
        return " ".join(pieces)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, tools: list[dict] | None = None,
                            **template_kwargs: Any) -> str:
        """Renders the chat template to a prompt string (not tokenized)."""
        if self.chat_template is None:
            raise ValueError("This model has no chat template; pass one with --chat-template "
                             "(a file path or an inline Jinja template).")
        return _compile_template(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **template_kwargs)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> Tokenizer:
    """The model's tokenizer; ``chat_template`` (a file path or an inline template) overrides
    the one the model ships."""
    tokenizer = _load_gguf(source.path) if source.kind == "gguf" else _load_hf(source.path)
    if chat_template is not None:
        tokenizer.chat_template = _read_template_arg(chat_template)
    if tokenizer.chat_template is None:
        logger.warning("Model %s has no chat template; chat requests will be refused.",
                       source.name)
    return tokenizer


def _read_template_arg(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # neither a file nor Jinja: most likely a mistyped path
        raise FileNotFoundError(f"Chat template '{value}' is neither a file nor a template.")
    return value


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _load_gguf(path: str) -> Tokenizer:
    from pagedllm.models.loader.gguf import gguf_metadata

    def meta(key: str, default: Any = None) -> Any:
        return gguf_metadata(path, f"tokenizer.{key}", default)

    if meta("ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer type {meta('ggml.model')!r} in {path} is not supported;"
                         " pagedllm builds byte-level BPE ('gpt2') tokenizers from GGUF files.")
    tokens: list[str] = list(meta("ggml.tokens"))
    types: list[int] = list(meta("ggml.token_type", []))
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # A token written outside the byte alphabet is respelled byte by byte, as the BPE sees it.
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta("ggml.merges", [])]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _PRE_SPLITS.get(meta("ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Control tokens (e.g. <|im_start|>) are special; user-defined ones (e.g. <think>) are kept
    # whole but are ordinary text, so skip_special_tokens keeps them (as transformers does).
    kinds = dict(enumerate(types))
    control = [AddedToken(t, normalized=False, special=True) for i, t in enumerate(tokens)
               if kinds.get(i) == _CONTROL and set(t) <= spelled]
    user = [AddedToken(t, normalized=False, special=False) for i, t in enumerate(tokens)
            if kinds.get(i) == _USER_DEFINED and t in vocab]
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return Tokenizer(backend, bos_token_id=meta("ggml.bos_token_id"),
                     eos_token_id=meta("ggml.eos_token_id"),
                     add_bos=bool(meta("ggml.add_bos_token", False)),
                     chat_template=meta("chat_template"))


def _load_hf(folder: str) -> Tokenizer:
    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{folder} has no tokenizer.json; pagedllm needs the fast "
                                "(tokenizers) format: save the tokenizer with transformers.")
    backend = BackendTokenizer.from_file(file)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))

    def token_id(name: str) -> int | None:
        token = config.get(name) or special_map.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        return backend.token_to_id(token) if token else None

    return Tokenizer(backend, bos_token_id=token_id("bos_token"),
                     eos_token_id=token_id("eos_token"),
                     add_bos=bool(config.get("add_bos_token", False)),
                     chat_template=_hf_chat_template(folder, config))


def _hf_chat_template(folder: str, config: dict[str, Any]) -> str | None:
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(
        os.path.join(folder, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def placeholder_tokenizer(vocab_size: int) -> Tokenizer:
    """A stand-in for config-only folders (``--load-format dummy``): token i is the word
    ``<i>``. Enough to run benchmarks on token ids; text in and out means nothing."""
    from tokenizers import models, pre_tokenizers

    backend = BackendTokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)},
                                                unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, bos_token_id=None, eos_token_id=None)
