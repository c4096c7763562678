"""Indexed token shards: a flat `.bin` of token ids and an `.idx` with document offsets.

A shard is a pair of files sharing a prefix (`train-00000.bin`, `train-00000.idx`):

    .bin   the token ids of every document, back to back, each document ending with EOS,
           little-endian uint16 or uint32
    .idx   a 32-byte header followed by the document offsets:
             magic        8 bytes   b"MPTOKIDX"
             version      uint32    1
             dtype code   uint32    1 = uint16, 2 = uint32
             num_tokens   uint64
             num_docs     uint64
             doc_offsets  uint64 × (num_docs + 1)   token index where each document starts;
                                                    the last entry is num_tokens

Reading is zero-copy (`np.memmap`); every size is checked against the header on open so a
truncated or corrupt shard fails with one line naming the file instead of garbage tokens.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from megapatch.errors import DataError

MAGIC = b"MPTOKIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, num_tokens, num_docs
HEADER_SIZE = _HEADER.size  # 32

DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


def shard_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(`.bin`, `.idx`) paths of the shard at `path` (its prefix, `.bin` or `.idx`)."""
    path = Path(path)
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype holding every id of a vocabulary of `vocab_size`."""
    if vocab_size <= 0:
        raise DataError(f"vocabulary size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise DataError(
        f"a vocabulary of {vocab_size} pieces does not fit uint32 token ids (at most {2**32})"
    )


class IndexedDataset:
    """One shard opened read-only by memory map.

    `.tokens` is the whole shard as a 1-D array (no copy), `.doc_offsets` the document
    boundaries, `.dtype` the token dtype. Pass `expected_dtype` (from the manifest) to
    refuse a shard written with another dtype.
    """

    def __init__(self, path: str | os.PathLike, expected_dtype: str | np.dtype | None = None):
        self.bin_path, self.idx_path = shard_paths(path)
        self.name = self.bin_path.with_suffix("").name
        self.dtype, num_tokens, self.doc_offsets = _read_index(self.idx_path)
        if expected_dtype is not None and np.dtype(expected_dtype) != self.dtype:
            raise DataError(
                f"{self.idx_path}: token dtype is {self.dtype.name} but the manifest says "
                f"{np.dtype(expected_dtype).name}"
            )
        if not self.bin_path.is_file():
            raise DataError(f"{self.bin_path}: missing (the .idx beside it has no .bin)")
        expected_bytes = num_tokens * self.dtype.itemsize
        actual_bytes = self.bin_path.stat().st_size
        if actual_bytes != expected_bytes:
            state = "truncated" if actual_bytes < expected_bytes else "longer than its index"
            raise DataError(
                f"{self.bin_path}: {state}: {actual_bytes} bytes, the index says {num_tokens} "
                f"{self.dtype.name} tokens ({expected_bytes} bytes)"
            )
        if num_tokens == 0:  # np.memmap refuses empty files
            self.tokens = np.empty(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(num_tokens,))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` (a view, ending with EOS)."""
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.name!r}, tokens={self.num_tokens}, "
            f"documents={self.num_documents}, dtype={self.dtype.name})"
        )


def _read_index(idx_path: Path) -> tuple[np.dtype, int, np.ndarray]:
    if not idx_path.is_file():
        raise DataError(f"{idx_path}: missing shard index")
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise DataError(f"{idx_path}: truncated: {size} bytes, shorter than the header")
        magic, version, code, num_tokens, num_docs = _HEADER.unpack(header)
        if magic != MAGIC:
            raise DataError(f"{idx_path}: not a megapatch shard index (wrong magic {magic!r})")
        if version != VERSION:
            raise DataError(f"{idx_path}: format version {version}, this reader knows {VERSION}")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: unknown token dtype code {code}")
        expected = HEADER_SIZE + 8 * (num_docs + 1)
        if size != expected:
            state = "truncated" if size < expected else "longer than its header says"
            raise DataError(
                f"{idx_path}: {state}: {size} bytes, the header says {num_docs} documents "
                f"({expected} bytes)"
            )
        offsets = np.frombuffer(f.read(), dtype="<u8")
    if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(offsets[1:] < offsets[:-1]):
        raise DataError(f"{idx_path}: corrupt document offsets (not 0..{num_tokens}, ascending)")
    return DTYPE_CODES[code], int(num_tokens), offsets


class IndexedDatasetWriter:
    """Writes one shard: append documents, then `close()` writes the index.

    Tokens stream to the `.bin` as they come; only the document offsets (8 bytes per
    document) are held in memory until the index is written.
    """

    def __init__(self, path: str | os.PathLike, dtype: str | np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _CODE_OF:
            raise ValueError(f"token dtype must be uint16 or uint32, got {self.dtype}")
        self.bin_path, self.idx_path = shard_paths(path)
        self._bin = open(self.bin_path, "wb")
        self._offsets = array("Q", [0])
        self.num_tokens = 0
        self._open_document = False

    def add_tokens(self, tokens: np.ndarray) -> None:
        """Append tokens to the current document (a document may arrive in pieces)."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        self._bin.write(memoryview(np.ascontiguousarray(tokens)))
        self.num_tokens += len(tokens)
        self._open_document = True

    def end_document(self) -> None:
        self._offsets.append(self.num_tokens)
        self._open_document = False

    def add_document(self, tokens: np.ndarray) -> None:
        self.add_tokens(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents at once: `tokens` is their concatenation."""
        if self._open_document:
            raise RuntimeError("add_documents() inside a document: call end_document() first")
        start = self.num_tokens
        self.add_tokens(tokens)
        self._offsets.extend((start + np.cumsum(lengths, dtype=np.int64)).tolist())
        self._open_document = False

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def close(self) -> None:
        if self._open_document:
            raise RuntimeError("close() inside a document: call end_document() first")
        self._bin.close()
        write_index(self.idx_path, self.dtype, np.frombuffer(self._offsets, dtype=np.uint64))

    def abort(self) -> None:
        """Close without writing the index (the caller removes the files)."""
        self._bin.close()


def write_index(idx_path: str | os.PathLike, dtype: np.dtype, doc_offsets: np.ndarray) -> None:
    """The `.idx` of a shard whose `.bin` holds `doc_offsets[-1]` tokens of `dtype`, document
    i at tokens [doc_offsets[i], doc_offsets[i + 1])."""
    code = _CODE_OF[np.dtype(dtype).newbyteorder("<")]
    offsets = np.asarray(doc_offsets).astype("<u8")
    with open(idx_path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, code, int(offsets[-1]), len(offsets) - 1))
        f.write(offsets.tobytes())
