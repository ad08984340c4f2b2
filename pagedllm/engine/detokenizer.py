"""Incremental detokenization and stop strings, shared by the offline API and streaming.

Each new token is decoded in a small window of recent tokens: ``prefix`` tokens give context
(sentencepiece drops a leading space at the start of a decode; byte-level tokens may be pieces of
one UTF-8 character) and the text they decode to is subtracted from the window's text. A token
whose text ends in U+FFFD is an incomplete character; its text is held until a later token
completes it, so the stream never shows a replacement character that the full decode would not.
"""

from __future__ import annotations

import logging

from tokenizers import decoders

from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as context for the first generated token's text.
_INITIAL_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, a few tokens at a time.

    Cost per call is O(new tokens): only ``ids[prefix_offset:]`` (a handful of tokens) is decoded,
    and stop strings are searched only in the new text plus an overlap of ``len(stop) - 1``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 params: SamplingParams, token_texts: dict[int, str] | None = None) -> None:
        """``token_texts`` caches the text of single tokens under ``params``' decode options;
        detokenizers whose requests share those options may share it."""
        self.tokenizer = tokenizer
        self.params = params
        self._token_texts = {} if token_texts is None else token_texts
        # A byte-level decoder joins the tokens' bytes, then reads them as UTF-8: two tokens that
        # are each whole characters decode to their two texts one after the other. (Spacing out
        # special tokens, done by Tokenizer.decode itself, is no such join.)
        self._byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel) and (
            params.skip_special_tokens or not params.spaces_between_special_tokens)
        self.stop: list[str] = list(params.stop or [])
        self.output_text = ""
        # Context from the prompt's tail, then every generated token.
        self._ids: list[int] = list(prompt_token_ids[-_INITIAL_CONTEXT:])
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._ids)  # tokens before this have been turned into text
        self._sent = 0  # characters of output_text already returned as deltas
        self._stopped = False
        self._hold = 0  # characters held back while streaming, so a stop string is never sent
        if self.stop and not params.include_stop_str_in_output:
            self._hold = max(len(s) for s in self.stop) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._decode([token_id])
        return text

    def _next_text(self, flush: bool = False) -> str:
        """Text completed by the tokens after ``read_offset``; advances the window if any.

        Unless ``flush``, a trailing incomplete UTF-8 character is left for the next token.
        """
        ids, start, read = self._ids, self._prefix_offset, self._read_offset
        # Mostly the window is the token before (its text likely cached) and one new token.
        prefix_text = self._token_text(ids[start]) if read - start == 1 else \
            self._decode(ids[start:read])
        full_text = None
        if self._byte_level and read - start == 1 and len(ids) == read + 1:
            new_text = self._token_text(ids[read])
            if _REPLACEMENT not in prefix_text and _REPLACEMENT not in new_text:
                full_text = prefix_text + new_text  # what decoding the two gives (see __init__)
        if full_text is None:
            full_text = self._decode(ids[start:])
        if len(full_text) <= len(prefix_text) and not flush:
            return ""  # e.g. a skipped special token, or bytes of an unfinished character
        if full_text.endswith(_REPLACEMENT) and not flush:
            return ""
        delta = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _plain_text(self, token_id: int) -> str | None:
        """``_next_text()`` for the newest token in the common case, without a decode: a
        byte-level window of two tokens (the one before, fully read, and this one) whose cached
        texts are whole characters, this one's not empty. None if not that case."""
        read = self._read_offset
        if not self._byte_level or read - self._prefix_offset != 1 or read != len(self._ids) - 1:
            return None
        texts = self._token_texts
        prefix_text, text = texts.get(self._ids[read - 1]), texts.get(token_id)
        if prefix_text is None or not text or _REPLACEMENT in prefix_text or _REPLACEMENT in text:
            return None
        self._prefix_offset, self._read_offset = read, read + 1
        return text

    def update(self, new_token_ids: list[int], stop_checking: bool) -> str | None:
        """Appends generated token ids; if ``stop_checking`` and a stop string (``params.stop``)
        now appears in the output text, truncates ``output_text`` there and returns that stop
        string, else None. Tokens after the one that completes a stop string are ignored."""
        if self._stopped:
            return None
        for token_id in new_token_ids:
            self._ids.append(token_id)
            before = len(self.output_text)
            delta = self._plain_text(token_id)
            if delta is None:
                delta = self._next_text()
            if not delta:
                continue
            self.output_text += delta
            if stop_checking and self.stop:
                stop = self._find_stop(before)
                if stop is not None:
                    return stop
        return None

    def _find_stop(self, new_from: int) -> str | None:
        """Earliest stop string that overlaps text at or after ``new_from``; truncates there."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.output_text.find(stop, max(0, new_from - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.output_text = self.output_text[:end]
        self._stopped = True
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The full text (``delta=False``) or the text not yet returned (``delta=True``).

        While not finished, the last ``longest stop - 1`` characters are held back, so a stop
        string that a later token completes is cut before any of it is sent.
        """
        if finished and not self._stopped and self._read_offset < len(self._ids):
            # An unfinished character at the very end: show what the full decode shows.
            self.output_text += self._next_text(flush=True)
        end = len(self.output_text) if finished else max(0, len(self.output_text) - self._hold)
        if not delta:
            return self.output_text[:end]
        if end <= self._sent:
            return ""
        text = self.output_text[self._sent:end]
        self._sent = end
        return text

    def decode_token(self, token_id: int) -> str:
        """One token's text on its own (logprobs' ``decoded_token``); special tokens included."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
