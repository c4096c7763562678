"""Input discovery and streaming reads.

Inputs are files, directories (searched recursively) or globs of `.txt` (one document
per file), `.jsonl`, `.jsonl.gz` and `.jsonl.zst` (one JSON object per line). The main
process only reads bytes: it cuts the inputs into ordered chunks of about `chunk_bytes`
that the workers decode, parse and tokenize, so memory stays bounded by the chunks in
flight whatever the size of a file.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from megapatch.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")
# Code points a JSON "\\udXXX" escape can produce but UTF-8 cannot encode.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "text" (the whole file is one document) or "jsonl"
    size: int  # bytes on disk
    label: str  # how the manifest and error messages name it

    @property
    def compressed(self) -> bool:
        return self.path.name.endswith((".gz", ".zst"))


def kind_of(path: Path) -> str | None:
    name = path.name
    if name.endswith(".txt"):
        return "text"
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    return None


def resolve_inputs(specs: list[str]) -> list[InputFile]:
    """The input files named by `specs`, in order: explicit files as given, directory and
    glob matches sorted by path. Each file once."""
    paths: list[Path] = []
    for spec in specs:
        if _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"input glob {spec!r} matched no files")
            for m in matches:
                paths += _files_under(Path(m)) if Path(m).is_dir() else [Path(m)]
            continue
        path = Path(spec)
        if not path.exists():
            raise DataError(f"input path not found: {spec}")
        if path.is_dir():
            found = _files_under(path)
            if not found:
                raise DataError(f"input directory {spec} holds no {', '.join(SUFFIXES)} files")
            paths += found
        else:
            paths.append(path)
    files, seen = [], set()
    for path in paths:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        kind = kind_of(path)
        if kind is None:
            raise DataError(f"unsupported input file {path}: expected one of {', '.join(SUFFIXES)}")
        files.append(InputFile(key, kind, key.stat().st_size, str(key)))
    return files


def _files_under(directory: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in names if not n.startswith(".") and kind_of(Path(n))]
    return sorted(found)


def open_binary(f: InputFile) -> BinaryIO:
    """The decompressed bytes of an input file."""
    name = f.path.name
    if name.endswith(".gz"):
        return gzip.open(f.path, "rb")
    if name.endswith(".zst"):
        raw = open(f.path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(f.path, "rb")


@dataclass
class Unit:
    """A piece of one document: a JSON line, or a block of a text file."""

    file: int  # index into the input file list
    where: int  # jsonl: line number (1-based); text: byte offset of the block
    data: bytes
    doc_end: bool  # the document ends with this unit (always for jsonl)


@dataclass
class Chunk:
    index: int
    units: list[Unit] = field(default_factory=list)
    nbytes: int = 0


def read_chunks(files: list[InputFile], chunk_bytes: int) -> Iterator[Chunk]:
    """Ordered chunks of about `chunk_bytes` (decompressed) over all files."""
    chunk = Chunk(0)
    for i, f in enumerate(files):
        for unit in _units(i, f, chunk_bytes):
            chunk.units.append(unit)
            chunk.nbytes += len(unit.data)
            if chunk.nbytes >= chunk_bytes:
                yield chunk
                chunk = Chunk(chunk.index + 1)
    if chunk.units:
        yield chunk


def _units(index: int, f: InputFile, block_bytes: int) -> Iterator[Unit]:
    try:
        with open_binary(f) as stream:
            if f.kind == "jsonl":
                for line_no, line in enumerate(stream, start=1):
                    yield Unit(index, line_no, line, True)
            else:
                yield from _text_blocks(index, stream, block_bytes)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise DataError(f"{f.label}: cannot read: {exc}") from None


def _text_blocks(index: int, stream: BinaryIO, block_bytes: int) -> Iterator[Unit]:
    """A text file in blocks cut where the tokenizer splits words anyway (after a run of
    newlines, else before a space), so tokenizing block by block changes nothing."""
    offset, buf = 0, stream.read(block_bytes)
    while True:
        more = stream.read(block_bytes)
        if not more:
            yield Unit(index, offset, buf, True)  # the last block (b"" for an empty file)
            return
        buf += more
        cut = _word_boundary(buf[:block_bytes]) if len(buf) > block_bytes else -1
        if cut <= 0:
            cut = _word_boundary(buf)
        if cut <= 0:
            if len(buf) < 16 * block_bytes:
                continue
            cut = _utf8_boundary(buf)  # one enormous word: cut anywhere valid
        yield Unit(index, offset, buf[:cut], False)
        offset += cut
        buf = buf[cut:]


def _word_boundary(buf: bytes) -> int:
    i = len(buf) - 1
    while True:  # the last newline followed by a non-newline
        i = buf.rfind(b"\n", 0, i)
        if i < 0:
            break
        if buf[i + 1 : i + 2] != b"\n":
            return i + 1
    i = len(buf)
    while True:  # else the last space after a non-space
        i = buf.rfind(b" ", 0, i)
        if i <= 0:
            return -1
        if buf[i - 1 : i] != b" ":
            return i


def _utf8_boundary(buf: bytes) -> int:
    cut = len(buf) - 1
    while cut > 0 and (buf[cut] & 0xC0) == 0x80:  # continuation byte
        cut -= 1
    return cut


def sample_documents(files: list[InputFile], text_key: str, budget_bytes: int) -> Iterator[str]:
    """Documents (or a text file's leading part) for training the tokenizer: the budget is
    split over the files, at least 1 MB each, so many small files give an evenly spaced
    subset. Undecodable bytes are replaced here; the tokenization pass applies the policy."""
    per_file = max(budget_bytes // len(files), min(budget_bytes, 1_000_000))
    count = min(len(files), max(1, budget_bytes // per_file))
    for f in (files[i * len(files) // count] for i in range(count)):
        with open_binary(f) as stream:
            if f.kind == "text":
                yield stream.read(per_file).decode("utf-8", errors="replace")
                continue
            taken = 0
            for line in stream:
                if taken >= per_file:
                    break
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                text = obj.get(text_key) if isinstance(obj, dict) else None
                if isinstance(text, str) and text:
                    taken += len(line)
                    yield LONE_SURROGATE.sub("\ufffd", text)
