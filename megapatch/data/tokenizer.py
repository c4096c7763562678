"""The sentencepiece tokenizer with the ids the data pipeline needs, and a fast exact encoder.

Encoding whole documents with sentencepiece's BPE runs at about 2 MB/s on one core. When
the vocabulary guarantees that no piece spans a word boundary (true of the tokenizers
`megapatch prep` trains: identity normalisation, no dummy prefix, pieces never cross a
space or a line break), a document is the concatenation of its words' encodings, so
each distinct word is encoded once and cached. The result is identical to
`SentencePieceProcessor.encode(text)`; other tokenizers take the plain path.
"""

from __future__ import annotations

import hashlib
import os
import re
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megapatch.data.indexed import token_dtype
from megapatch.errors import DataError

# A word: a run of spaces, then anything but spaces and newlines, then a run of newlines.
# Its boundaries are exactly "non-space | space" and "newline | non-newline".
_WORD = re.compile(r" *+[^ \n]*+\n*+")
# A piece spanning one of those boundaries (sentencepiece writes a space as U+2581).
_SPANS_BOUNDARY = re.compile("[^\u2581]\u2581|\n[^\n]")
# Round trip of this exercises whitespace handling and unicode normalisation.
_PROBE = "a  b\n\n\t c \r\n d\ufb01 \uff21\u00e9\u0065\u0301 \U0001f642  "

# The word cache is dropped when it grows past either bound (about 150 MB per process).
_CACHE_WORDS = 1 << 20
_CACHE_CHARS = 1 << 26


class Tokenizer:
    """A sentencepiece model: `encode(text) -> ids`, `decode(ids) -> text`, and its ids.

    `bos_id`, `eos_id`, `pad_id`, `unk_id` are -1 where the model defines none.
    Picklable (by its model bytes), so worker processes can receive it.
    """

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.source = source
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{source}: not a sentencepiece model ({exc})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id()
        self.unk_id = self._sp.unk_id()
        try:
            self.dtype = token_dtype(self.vocab_size)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
        self.sha256 = hashlib.sha256(self._proto).hexdigest()
        self.words_are_independent = self._check_words_are_independent()
        self._cache: dict[str, bytes] = {}  # word -> its token ids as bytes
        self._cached_chars = 0

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        return self._sp

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (no BOS/EOS added), as an array of `self.dtype`."""
        if not self.words_are_independent:
            return np.array(self._sp.encode(text), dtype=self.dtype)
        words = _WORD.findall(text)
        cache = self._cache
        parts = list(map(cache.get, words))
        if None in parts:
            missing = list(dict.fromkeys(w for w, p in zip(words, parts) if p is None))
            fresh = dict(zip(missing, self._encode_words(missing)))
            parts = [fresh[w] if p is None else p for w, p in zip(words, parts)]
            self._cached_chars += sum(map(len, missing))
            if len(cache) + len(fresh) > _CACHE_WORDS or self._cached_chars > _CACHE_CHARS:
                cache.clear()
                self._cached_chars = sum(map(len, missing))
            cache.update(fresh)
        return np.frombuffer(bytearray().join(parts), dtype=self.dtype)

    def encode_plain(self, text: str) -> np.ndarray:
        """sentencepiece's own encoding of the whole text (the reference for `encode`)."""
        return np.array(self._sp.encode(text), dtype=self.dtype)

    def decode(self, ids) -> str:
        """Text of `ids`; byte pieces that form no valid UTF-8 decode to U+FFFD."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def _encode_words(self, words: list[str]) -> list[bytes]:
        ids = self._sp.encode(words, num_threads=1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(
            chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum())
        ).tobytes()
        ends = (np.cumsum(lengths) * self.dtype.itemsize).tolist()
        return [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]

    def _check_words_are_independent(self) -> bool:
        sp = self._sp
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
                continue
            if _SPANS_BOUNDARY.search(sp.id_to_piece(i)):
                return False
        no_dummy_prefix = not sp.encode("a", out_type=str)[0].startswith("\u2581")
        identity = sp.decode(sp.encode(_PROBE)) == _PROBE
        return no_dummy_prefix and identity

    def __getstate__(self):
        return {"model_proto": self._proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
