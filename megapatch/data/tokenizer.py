"""Tokenizers behind one interface: sentencepiece models and Hugging Face `tokenizer.json`.

    tok = load_tokenizer("data/x/tokenizer.model")    # or a tokenizer.json, or an HF model dir
    ids = tok.encode(text)                             # np.ndarray of tok.dtype, no BOS/EOS
    tok.eos_id, tok.bos_id, tok.vocab_size, tok.save(directory)

Each keeps its own form on disk (`files()`): a sentencepiece `tokenizer.model`, or a
`tokenizer.json` with its `tokenizer_config.json`, so exports and `AutoTokenizer` read
the same files prep encoded with.

Sentencepiece and the word cache: encoding whole documents with sentencepiece's BPE runs
at about 2 MB/s on one core. When the vocabulary guarantees that no piece spans a word
boundary (true of the tokenizers `megapatch prep` trains: identity normalisation, no
dummy prefix, pieces never cross a space or a line break), a document is the
concatenation of its words' encodings, so each distinct word is encoded once and cached.
The result is identical to `SentencePieceProcessor.encode(text)`; other sentencepiece
models take the plain path. Hugging Face tokenizers encode in batches in Rust
(`hf_tokenizer.HFTokenizer`).
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

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Every file a tokenizer may bring into a prep or run directory.
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_FILE, "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """What the data pipeline needs of a tokenizer.

    `vocab_size`, `dtype` (of its token ids), `bos_id`, `eos_id`, `pad_id`, `unk_id` (-1
    where it defines none), `sha256` (of its main file), `kind` ("sentencepiece" or
    "huggingface"), `file_name` (its main file), `source` (where it was read).
    Subclasses are picklable, so worker processes can receive them.
    """

    kind = ""
    file_name = ""
    reads_json = False  # its files are JSON (told apart from sentencepiece's protobuf)
    _kinds: list[type[Tokenizer]] = []  # every subclass, for `load_tokenizer`
    words_are_independent = False  # sentencepiece's word cache is exact (module docstring)
    _cache: dict[str, bytes]  # word -> its token ids as bytes
    _cached_chars = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Tokenizer._kinds.append(cls)

    @staticmethod
    def from_file(path: str | os.PathLike) -> Tokenizer:
        return load_tokenizer(path)

    @classmethod
    def from_json_file(cls, path: Path, data: bytes) -> Tokenizer:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def prepare(self) -> None:
        """Build what encoding needs, once (prep calls it before worker processes fork)."""

    def decode(self, ids) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """The files that carry this tokenizer, by name (the main one first)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `files()` into `directory`; the path of the main file."""
        directory = Path(directory)
        for name, data in self.files().items():
            (directory / name).write_bytes(data)
        return directory / self.file_name

    def cut_is_exact(self, left: str, right: str) -> bool:
        """Whether encoding `left` and `right` apart gives the tokens of `left + right`."""
        joined = np.concatenate([self.encode(left), self.encode(right)])
        return np.array_equal(joined, self.encode(left + right))

    def _encode_cached(self, words: list[str]) -> np.ndarray:
        """The concatenated ids of `words`, each distinct word encoded once
        (`_encode_words`) and kept in a bounded cache."""
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

    def _encode_words(self, words: list[str]) -> list[bytes]:
        """Each word's ids as bytes of `dtype` (for the word cache)."""
        raise NotImplementedError

    def _pickled(self):
        """What the constructor takes (with `source`) to build this tokenizer again."""
        raise NotImplementedError

    def __getstate__(self):  # pickled by its files: worker processes rebuild it
        return {"data": self._pickled(), "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["data"], state["source"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def _set_ids(self, vocab_size: int, bos: int, eos: int, pad: int, unk: int) -> None:
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos, eos, pad, unk
        self._cache, self._cached_chars = {}, 0
        try:
            self.dtype = token_dtype(vocab_size)
        except DataError as exc:
            raise DataError(f"{self.source}: {exc}") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A sentencepiece `.model`, a `tokenizer.json`, or a directory holding one (a Hugging
    Face model or tokenizer directory, a prep or run directory). Files are told apart by
    content, not name."""
    path = Path(path)
    if path.is_dir():
        for name in (HF_FILE, SENTENCEPIECE_FILE):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise DataError(f"{path}: holds neither {HF_FILE} nor {SENTENCEPIECE_FILE}")
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        # megapatch.data (always imported before this module) imports hf_tokenizer
        json_kind = next(k for k in Tokenizer._kinds if k.reads_json)
        return json_kind.from_json_file(path, data)
    return SentencePieceTokenizer(data, source=str(path))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model: `encode(text) -> ids`, `decode(ids) -> text`, and its ids.
    Picklable by its model bytes."""

    kind = "sentencepiece"
    file_name = SENTENCEPIECE_FILE

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.source = source
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{source}: not a sentencepiece model ({exc})") from None
        sp = self._sp
        self._set_ids(sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
        self.sha256 = hashlib.sha256(self._proto).hexdigest()
        self.words_are_independent = self._check_words_are_independent()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    def files(self) -> dict[str, bytes]:
        return {SENTENCEPIECE_FILE: self._proto}

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
        return self._encode_cached(_WORD.findall(text))

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

    def _pickled(self) -> bytes:
        return self._proto
