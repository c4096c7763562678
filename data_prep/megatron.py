"""Megatron-LM / GPT-NeoX indexed datasets (`MMIDIDX` `.bin`/`.idx` pairs) as a megapatch
prep: the token ids are kept, nothing is re-tokenized.

The format (megatron.core.datasets.indexed_dataset): the `.bin` holds every sequence's
token ids back to back; the `.idx` holds

    magic b"MMIDIDX\\x00\\x00", version uint64 (1), dtype code uint8,
    sequence count uint64, document count uint64,
    sequence lengths int32 × sequences, sequence byte offsets int64 × sequences,
    document indices int64 × documents (the sequence each document starts at, then the count),
    [sequence modes int8 × sequences, multimodal datasets only]

A Megatron document (its sequences together) becomes a megapatch document; one that does
not end with the tokenizer's EOS (shards made without `--append-eod`) gets one appended.
When nothing has to change (no validation split, the same token width, every document
already ending with EOS) the `.bin` is hard-linked into the prep as it is (zero-copy) and
only a megapatch `.idx` is written; otherwise the tokens are rewritten in large blocks.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.output import SplitWriter, is_valid_mask
from megapatch.data.tokenizer import Tokenizer
from megapatch.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
DTYPES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}  # fmt: skip
BLOCK_TOKENS = 1 << 24  # tokens read (and written) at a time


@dataclass
class MegatronShard:
    prefix: str
    bin_path: Path
    dtype: np.dtype
    tokens: np.ndarray  # the whole .bin, memory-mapped
    doc_offsets: np.ndarray  # int64 [documents + 1]: token index where each document starts

    @property
    def num_bytes(self) -> int:
        return self.bin_path.stat().st_size + self.bin_path.with_suffix(".idx").stat().st_size


def open_megatron(prefix: str) -> MegatronShard:
    """The shard at `prefix` (or `prefix.bin` / `prefix.idx`), its sizes checked."""
    base = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    bin_path, idx_path = Path(base + ".bin"), Path(base + ".idx")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"--from-megatron {prefix}: {path} not found")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else b""
    if len(raw) < _HEADER.size:
        raise DataError(f"{idx_path}: truncated: {len(raw)} bytes, shorter than the header")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(bytes(raw[: _HEADER.size]))
    if magic != MAGIC:
        raise DataError(f"{idx_path}: not a Megatron indexed dataset (magic {magic!r})")
    if version != 1 or code not in DTYPES:
        raise DataError(f"{idx_path}: unknown version {version} or dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    if dtype.kind == "f":
        raise DataError(f"{idx_path}: holds {dtype.name} values, not token ids")
    needed = _HEADER.size + n_seq * 12 + n_doc * 8
    if len(raw) < needed:
        raise DataError(
            f"{idx_path}: truncated: {len(raw)} bytes, the header says {n_seq} sequences and "
            f"{n_doc} document indices ({needed} bytes)"
        )
    at = _HEADER.size
    lengths = np.frombuffer(raw, np.int32, n_seq, at).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, n_seq, at + 4 * n_seq)
    doc_index = np.frombuffer(raw, np.int64, n_doc, at + 12 * n_seq)
    seq_starts = np.concatenate([[0], np.cumsum(lengths)])
    num_tokens = int(seq_starts[-1])
    if not np.array_equal(pointers, seq_starts[:-1] * dtype.itemsize):
        raise DataError(f"{idx_path}: sequences are not stored back to back in the .bin")
    if n_doc == 0 or doc_index[0] != 0 or doc_index[-1] != n_seq or np.any(np.diff(doc_index) < 0):
        raise DataError(f"{idx_path}: corrupt document indices (not 0..{n_seq}, ascending)")
    size = bin_path.stat().st_size
    if size != num_tokens * dtype.itemsize:
        raise DataError(
            f"{bin_path}: {size} bytes, its index says {num_tokens} {dtype.name} tokens "
            f"({num_tokens * dtype.itemsize} bytes)"
        )
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if num_tokens else np.empty(0, dtype)
    return MegatronShard(prefix, bin_path, dtype, tokens, seq_starts[doc_index])


def check_ids(shards: list[MegatronShard], tokenizer: Tokenizer, progress: bool) -> None:
    """Refuse shards holding an id the tokenizer's vocabulary cannot hold (one pass over
    the tokens, at disk speed)."""
    total = sum(len(s.tokens) for s in shards)
    with _bar(total, "checking ids", progress) as bar:
        for shard in shards:
            for start in range(0, len(shard.tokens), BLOCK_TOKENS):
                block = shard.tokens[start : start + BLOCK_TOKENS]
                low, high = int(block.min()), int(block.max())
                if low < 0 or high >= tokenizer.vocab_size:
                    bad = low if low < 0 else high
                    at = start + int(np.argmax(block == bad))
                    raise DataError(
                        f"{shard.bin_path}: token id {bad} (token {at}) does not fit the "
                        f"tokenizer {tokenizer.source} of {tokenizer.vocab_size} tokens: pass the "
                        "tokenizer these shards were made with"
                    )
                bar.update(len(block))


def convert(
    shards: list[MegatronShard],
    writers: dict[str, SplitWriter],
    tokenizer: Tokenizer,
    valid_fraction: float,
    progress: bool,
) -> tuple[int, bool]:
    """Write every document of `shards` to the train/valid writers, held-out ones evenly
    spaced as in a text prep: (documents, whether every shard was linked zero-copy)."""
    eos, dtype = tokenizer.eos_id, tokenizer.dtype
    doc_index, linked_all = 0, True
    total = sum(len(s.tokens) for s in shards)
    with _bar(total, "converting", progress) as bar:
        for shard in shards:
            offsets = np.unique(shard.doc_offsets)  # empty documents dropped
            ends = offsets[1:]
            if not len(ends):
                continue
            same_width = shard.dtype.itemsize == dtype.itemsize and shard.dtype.kind in "iu"
            if valid_fraction == 0 and same_width and np.all(shard.tokens[ends - 1] == eos):
                writers["train"].add_linked_shard(shard.bin_path, offsets)
                doc_index += len(ends)
                bar.update(len(shard.tokens))
                continue
            linked_all = False
            first = 0  # the first document of the next block
            while first < len(ends):
                limit = offsets[first] + BLOCK_TOKENS  # whole documents, at least one
                last = max(first + 1, int(np.searchsorted(ends, limit, side="right")))
                start, stop = offsets[first], ends[last - 1]
                tokens = np.asarray(shard.tokens[start:stop]).astype(dtype)
                doc_ends = ends[first:last] - start
                needs_eos = tokens[doc_ends - 1] != eos
                tokens = np.insert(tokens, doc_ends[needs_eos], eos)
                lengths = np.diff(np.concatenate([[0], doc_ends])) + needs_eos
                valid = is_valid_mask(doc_index, len(lengths), valid_fraction)
                _write_runs(writers, tokens, lengths, valid)
                doc_index += len(lengths)
                bar.update(int(stop - start))
                first = last
    return doc_index, linked_all


def _write_runs(writers, tokens: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> None:
    """Each run of consecutive documents of one split in one call."""
    changes = np.flatnonzero(np.diff(valid.astype(np.int8))) + 1
    bounds = [0, *changes.tolist(), len(lengths)]
    ends = np.concatenate([[0], np.cumsum(lengths)])
    for a, b in zip(bounds[:-1], bounds[1:]):
        split = "valid" if valid[a] else "train"
        writers[split].add_documents(tokens[ends[a] : ends[b]], lengths[a:b])


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr,
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
