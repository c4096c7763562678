"""A prep output directory read as one token sequence, and blends of several."""

from __future__ import annotations

import hashlib
import math
import os
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megapatch.data.indexed import IndexedDataset
from megapatch.data.manifest import MANIFEST_NAME, read_manifest
from megapatch.errors import ConfigError, DataError


class Corpus:
    """One split ("train" or "valid") of one prep directory: its shards, concatenated.

    `.num_tokens`, `.vocab_size` (from the manifest), `.eos_id`/`.bos_id`/`.pad_id`/
    `.unk_id` (-1 where the tokenizer defines none), `.tokenizer_path`, `.dtype`.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        manifest = read_manifest(self.directory)
        self.manifest = manifest
        where = self.directory / MANIFEST_NAME
        info = manifest["splits"].get(split)
        if info is None or not info["shards"]:
            hint = " (prepared with --valid-fraction 0?)" if split == "valid" else ""
            raise DataError(f"{self.directory} has no {split!r} split{hint}")
        self.vocab_size = int(manifest["vocab_size"])
        self.dtype = np.dtype(manifest["dtype"])
        self.shards = []
        for entry in info["shards"]:
            shard = IndexedDataset(self.directory / entry["name"], expected_dtype=self.dtype)
            if (shard.num_tokens, shard.num_documents) != (
                entry["num_tokens"],
                entry["num_documents"],
            ):
                raise DataError(
                    f"{shard.idx_path}: holds {shard.num_tokens} tokens in "
                    f"{shard.num_documents} documents but {where} says {entry['num_tokens']} "
                    f"in {entry['num_documents']}"
                )
            self.shards.append(shard)
        # Token index where each shard starts in the concatenation.
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard.num_tokens)
        self.num_tokens = self._starts[-1]
        self.num_documents = sum(s.num_documents for s in self.shards)

        tok = manifest["tokenizer"]
        self.tokenizer_path = self.directory / tok["file"]
        self.tokenizer_sha256 = tok["sha256"]
        if not self.tokenizer_path.is_file():
            raise DataError(f"{self.tokenizer_path}: missing (named by {where})")
        actual = hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest()
        if actual != self.tokenizer_sha256:
            raise DataError(
                f"{self.tokenizer_path}: sha256 {actual[:12]}… differs from {where} "
                f"({self.tokenizer_sha256[:12]}…): the shards were made with another tokenizer"
            )
        self.bos_id = int(tok.get("bos_id", -1))
        self.eos_id = int(tok.get("eos_id", -1))
        self.pad_id = int(tok.get("pad_id", -1))
        self.unk_id = int(tok.get("unk_id", -1))

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated shards (into `out` if given)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        if out is None:
            out = np.empty(length, dtype=self.dtype)
        i = bisect_right(self._starts, start) - 1
        pos = start - self._starts[i]
        done = 0
        while done < length:  # a range crosses into the next shard only at its end
            tokens = self.shards[i].tokens
            take = min(length - done, len(tokens) - pos)
            out[done : done + take] = tokens[pos : pos + take]
            done += take
            i, pos = i + 1, 0
        return out

    def __repr__(self) -> str:
        return (
            f"Corpus({str(self.directory)!r}, split={self.split!r}, tokens={self.num_tokens}, "
            f"shards={len(self.shards)})"
        )


class BlendedCorpus:
    """Several corpora sampled in proportion to their weights (normalised to sum to 1).

    All must share one tokenizer; the vocabulary and special ids are theirs.
    """

    def __init__(self, sources: Sequence[Corpus], weights: Sequence[float]):
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source, at least one source")
        first = sources[0]
        for other in sources[1:]:
            if other.tokenizer_sha256 != first.tokenizer_sha256:
                raise DataError(
                    f"cannot blend {first.directory} and {other.directory}: they were "
                    "tokenized with different tokenizers"
                )
        total = float(sum(weights))
        self.sources = list(sources)
        self.weights = [float(w) / total for w in weights]
        self.split = first.split
        self.vocab_size = first.vocab_size
        self.dtype = first.dtype
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            first.bos_id,
            first.eos_id,
            first.pad_id,
            first.unk_id,
        )
        self.tokenizer_path = first.tokenizer_path
        self.tokenizer_sha256 = first.tokenizer_sha256
        self.num_tokens = sum(s.num_tokens for s in self.sources)
        self.num_documents = sum(s.num_documents for s in self.sources)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.directory}: {w:.3g}" for s, w in zip(self.sources, self.weights))
        return f"BlendedCorpus({parts})"


def sources_of(corpus: Corpus | BlendedCorpus) -> list[tuple[Corpus, float]]:
    """(corpus, weight) pairs: one pair of weight 1 for a plain corpus."""
    if isinstance(corpus, BlendedCorpus):
        return list(zip(corpus.sources, corpus.weights))
    return [(corpus, 1.0)]


def open_corpus(spec: Any, split: str = "train") -> Corpus | BlendedCorpus:
    """Open the `split` of a prep directory, or of a blend given as
    `[{"path": DIR, "weight": W}, ...]` (one entry gives a plain corpus)."""
    if isinstance(spec, (str, os.PathLike)):
        return Corpus(spec, split)
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(
            f"data: expected a prep directory or a list of {{path, weight}}, got {spec!r}"
        )
    paths, weights = [], []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"data blend entry {i}: expected {{path, weight}}, got {entry!r}")
        weight = entry.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ConfigError(
                f"data blend entry {i} ({entry['path']}): weight must be a positive number, "
                f"got {weight!r}"
            )
        paths.append(entry["path"])
        weights.append(float(weight))
    corpora = [Corpus(p, split) for p in paths]
    if len(corpora) == 1:
        return corpora[0]
    return BlendedCorpus(corpora, weights)
