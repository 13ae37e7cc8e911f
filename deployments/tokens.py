"""Counting and cutting text in Qwen2.5 tokens, exactly or approximately.

Exact: a ``tiktoken.Encoding`` built from the Qwen2.5 rank file
(``shared/data/tokenizer/qwen.tiktoken``) with Qwen's pre-tokenizer regex.
The trace pools' lengths were counted with it, so cuts match them exactly.

Approximation (no rank file configured, e.g. the embedded default): one token
per *piece* of Qwen's pre-tokenizer (a word with its leading space, a digit, a
punctuation run, a whitespace run). BPE never merges across pieces, so this is
a lower bound of the true count; on the main pool's responses it is 0.93 of it
(measured on every 10th response; long LaTeX words split into several tokens). The
replay engine always *reports* the recorded lengths in ``usage``; only the text
cut is approximate.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from functools import lru_cache

import regex

#: Qwen2 / Qwen2.5 pre-tokenizer pattern.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PIECES = regex.compile(QWEN_PATTERN)
#: Filler for synthesised responses: one token per repetition in both modes.
FILLER_PIECE = " step"


class TokenCodec:
    """Count, split and cut text in tokens; exact with a rank file, else approximate."""

    def __init__(self, tokenizer_path: str | None = None):
        self.exact = tokenizer_path is not None
        self._enc = _qwen_encoding(tokenizer_path) if tokenizer_path else None

    @property
    def encoding(self):
        """The tiktoken encoding (token ids), or None when counting approximately."""
        return self._enc

    def pieces(self, text: str) -> list[str]:
        """Text split into token-sized strings (joined they give back the text)."""
        if self._enc is None:
            return _PIECES.findall(text)
        ids = self._enc.encode_ordinary(text)
        return _decode_pieces(self._enc, ids)

    def count(self, text: str) -> int:
        if self._enc is None:
            return len(_PIECES.findall(text))
        return len(self._enc.encode_ordinary(text))

    def cut(self, text: str, n: int) -> list[str]:
        """The first ``n`` token-sized pieces of ``text`` padded with filler to exactly ``n``."""
        pieces = self.pieces(text)[:n]
        if len(pieces) < n:
            pieces.extend(filler(n - len(pieces)))
        return pieces


def filler(n: int) -> list[str]:
    """``n`` one-token pieces of synthetic text (used for samples without a recorded response)."""
    return [FILLER_PIECE] * n


def _decode_pieces(enc, ids: list[int]) -> Iterator[str]:
    """Decode token by token without splitting multi-byte characters across pieces.

    A piece that ends inside a UTF-8 character carries an empty string; the
    bytes appear with the token that completes the character, so the number of
    pieces stays the number of tokens.
    """
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(enc.decode_single_token_bytes(t)) for t in ids]
    tail = dec.decode(b"", final=True)
    if tail and out:
        out[-1] += tail
    return out


@lru_cache(maxsize=4)
def _qwen_encoding(path: str):
    import tiktoken

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return tiktoken.Encoding(name="qwen2.5", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
