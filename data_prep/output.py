"""Writing a prep: shards of a split, and moving the staged prep into place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megapatch.data.indexed import IndexedDatasetWriter
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

    def add_tokens(self, tokens: np.ndarray) -> None:
        if self.current is None:
            name = f"{self.split}-{len(self.shards):05d}"
            self.current = IndexedDatasetWriter(self.directory / name, self.dtype)
            self.shards.append({"name": name})
        self.current.add_tokens(tokens)
        self.in_document = True

    def end_document(self) -> None:
        self.current.end_document()
        self.in_document = False
        if self.current.num_tokens >= self.shard_tokens:
            self._close_shard()

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
