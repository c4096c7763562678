"""Writing a prep: shards of a split, and moving the staged prep into place."""

from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megapatch.data.indexed import IndexedDatasetWriter, write_index
from megapatch.data.manifest import MANIFEST_NAME


class SplitWriter:
    """The shards of one split: a new shard starts at a document boundary once the current
    one holds `shard_tokens` tokens. No shard is made for a split without documents."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.current: IndexedDatasetWriter | None = None
        self.in_document = False

    def _open_shard(self) -> IndexedDatasetWriter:
        if self.current is None:
            name = f"{self.split}-{len(self.shards):05d}"
            self.current = IndexedDatasetWriter(self.directory / name, self.dtype)
            self.shards.append({"name": name})
        return self.current

    def add_tokens(self, tokens: np.ndarray) -> None:
        self._open_shard().add_tokens(tokens)
        self.in_document = True

    def end_document(self) -> None:
        self.current.end_document()
        self.in_document = False
        if self.current.num_tokens >= self.shard_tokens:
            self._close_shard()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Whole documents at once (`tokens` their concatenation), starting new shards as
        `end_document` would."""
        ends = np.cumsum(lengths, dtype=np.int64)
        done, first = 0, 0  # tokens and documents written
        while first < len(lengths):
            room = self.shard_tokens - self._open_shard().num_tokens
            # documents up to and including the one that fills the shard
            last = min(int(np.searchsorted(ends, done + room, side="left")), len(lengths) - 1)
            self.current.add_documents(tokens[done : ends[last]], lengths[first : last + 1])
            self.in_document = False
            done, first = int(ends[last]), last + 1
            if self.current.num_tokens >= self.shard_tokens:
                self._close_shard()

    def add_linked_shard(self, bin_path: Path, doc_offsets: np.ndarray) -> None:
        """A whole shard whose `.bin` already exists in this layout: hard-linked (copied
        where the file system cannot link it), with a new index."""
        if self.current is not None:
            self._close_shard()
        name = f"{self.split}-{len(self.shards):05d}"
        target = self.directory / f"{name}.bin"
        try:
            os.link(bin_path, target)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(bin_path, target)
        write_index(self.directory / f"{name}.idx", self.dtype, doc_offsets)
        self.shards.append(
            {
                "name": name,
                "num_tokens": int(doc_offsets[-1]),
                "num_documents": len(doc_offsets) - 1,
            }
        )

    def _close_shard(self) -> None:
        self.current.close()
        self.shards[-1].update(
            num_tokens=self.current.num_tokens, num_documents=self.current.num_documents
        )
        self.current = None

    def close(self) -> list[dict]:
        if self.current is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None


@contextmanager
def split_writers(directory: Path, dtype: np.dtype, shard_tokens: int):
    """{"train": SplitWriter, "valid": SplitWriter}; on an error every open shard is closed
    unfinished (the caller removes the staging directory)."""
    writers = {s: SplitWriter(directory, s, dtype, shard_tokens) for s in ("train", "valid")}
    try:
        yield writers
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def close_all(writers: dict[str, SplitWriter]) -> dict[str, list[dict]]:
    return {s: w.close() for s, w in writers.items()}


def commit_staging(staging: Path, out: Path, replace: list[Path]) -> None:
    """Move the staged prep into `out`, replacing the files of an older prep; the
    manifest goes first out and last in, so a prep without it is never taken as complete."""
    old_manifest = out / MANIFEST_NAME
    if old_manifest in replace:
        old_manifest.unlink()
    for path in replace:
        if path != old_manifest and path.exists():
            path.unlink()
    names = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST_NAME)
    for name in [*names, MANIFEST_NAME]:
        os.replace(staging / name, out / name)
    staging.rmdir()


def _is_valid(doc_index: int, fraction: float) -> bool:
    """Held-out documents, evenly spaced: the first n hold round(n · fraction) of them."""
    return math.floor((doc_index + 1) * fraction + 0.5) > math.floor(doc_index * fraction + 0.5)


def is_valid_mask(first: int, count: int, fraction: float) -> np.ndarray:
    """`_is_valid` of documents first, ..., first + count - 1 (the same float arithmetic)."""
    i = np.arange(first, first + count, dtype=np.float64)
    return np.floor((i + 1) * fraction + 0.5) > np.floor(i * fraction + 0.5)
