"""Input discovery and streaming reads.

Inputs are files, directories (searched recursively) or globs of `.txt` (one document
per file), `.jsonl`, `.jsonl.gz` and `.jsonl.zst` (one JSON object per line), `.parquet`
and `.arrow` (one row per document, the text in a string column; a `datasets`
`save_to_disk` directory is a directory of `.arrow` files). The main process only reads
bytes: it cuts the inputs into ordered chunks of about `chunk_bytes` that the workers
decode, parse and tokenize, so memory stays bounded by the chunks in flight whatever the
size of a file. Tables are read a batch of rows at a time (Parquet by row group, Arrow
memory-mapped), only the text column.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from megapatch.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
TABLE_BATCH_ROWS = 1024
# Bytes of context each side of a text-file cut that a tokenizer checks the cut against.
CUT_CONTEXT = 128
CUT_TRIES = 8
# Code points a JSON "\\udXXX" escape can produce but UTF-8 cannot encode.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "text" (the whole file is one document), "jsonl", "parquet" or "arrow"
    size: int  # bytes on disk
    label: str  # how the manifest and error messages name it

    @property
    def compressed(self) -> bool:  # its size on disk is not the size of its text
        return self.path.name.endswith((".gz", ".zst")) or self.is_table

    @property
    def is_table(self) -> bool:
        return self.kind in ("parquet", "arrow")


def kind_of(path: Path) -> str | None:
    name = path.name
    if name.endswith(".txt"):
        return "text"
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith((".parquet", ".arrow")):
        return name.rsplit(".", 1)[1]
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
    where: int  # jsonl: line number (1-based); text: byte offset of the block; table: row (0-based)
    data: bytes | None  # None: a table row without text
    doc_end: bool  # the document ends with this unit (always for jsonl and tables)
    problem: str = ""  # why a table row has no text


@dataclass
class Chunk:
    index: int
    units: list[Unit] = field(default_factory=list)
    nbytes: int = 0


CutCheck = Callable[[str, str], bool]


def read_chunks(
    files: list[InputFile],
    chunk_bytes: int,
    text_key: str = "text",
    cut_ok: CutCheck | None = None,
) -> Iterator[Chunk]:
    """Ordered chunks of about `chunk_bytes` (decompressed) over all files. A text file is
    cut between words; with `cut_ok` (a tokenizer's `cut_is_exact`) only where it says the
    two sides encode apart as they do together."""
    chunk = Chunk(0)
    for i, f in enumerate(files):
        for unit in _units(i, f, chunk_bytes, text_key, cut_ok):
            chunk.units.append(unit)
            chunk.nbytes += len(unit.data) if unit.data else 16
            if chunk.nbytes >= chunk_bytes:
                yield chunk
                chunk = Chunk(chunk.index + 1)
    if chunk.units:
        yield chunk


def _units(
    index: int, f: InputFile, block_bytes: int, text_key: str, cut_ok: CutCheck | None
) -> Iterator[Unit]:
    if f.is_table:
        yield from table_units(index, f, text_key)
        return
    try:
        with open_binary(f) as stream:
            if f.kind == "jsonl":
                for line_no, line in enumerate(stream, start=1):
                    yield Unit(index, line_no, line, True)
            else:
                yield from _text_blocks(index, stream, block_bytes, cut_ok)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise DataError(f"{f.label}: cannot read: {exc}") from None


def _text_blocks(
    index: int, stream: BinaryIO, block_bytes: int, cut_ok: CutCheck | None = None
) -> Iterator[Unit]:
    """A text file in blocks cut where the tokenizer splits words anyway (after a run of
    newlines, else before a space), so tokenizing block by block changes nothing. With
    `cut_ok`, a boundary is taken only if the tokenizer agrees on the bytes around it."""
    find = _word_boundary if cut_ok is None else lambda b: _checked_boundary(b, cut_ok)
    offset, buf = 0, stream.read(block_bytes)
    while True:
        more = stream.read(block_bytes)
        if not more:
            yield Unit(index, offset, buf, True)  # the last block (b"" for an empty file)
            return
        buf += more
        cut = find(buf[:block_bytes]) if len(buf) > block_bytes else -1
        if cut <= 0:
            cut = find(buf)
        if cut <= 0:
            if len(buf) < 16 * block_bytes:
                continue
            # one enormous word, or a tokenizer no cut suits: cut anywhere valid
            cut = _word_boundary(buf) if cut_ok else -1
            if cut <= 0:
                cut = _utf8_boundary(buf)
        yield Unit(index, offset, buf[:cut], False)
        offset += cut
        buf = buf[cut:]


def _boundaries(buf: bytes) -> Iterator[int]:
    """Word boundaries from the end: after each run of newlines, then before each run of
    spaces."""
    i = len(buf) - 1
    while (i := buf.rfind(b"\n", 0, i)) >= 0:  # a newline followed by a non-newline
        if buf[i + 1 : i + 2] != b"\n":
            yield i + 1
    i = len(buf)
    while (i := buf.rfind(b" ", 0, i)) > 0:  # a space after a non-space
        if buf[i - 1 : i] != b" ":
            yield i


def _word_boundary(buf: bytes) -> int:
    return next(_boundaries(buf), -1)


def _checked_boundary(buf: bytes, cut_ok: CutCheck) -> int:
    for tries, cut in enumerate(_boundaries(buf)):
        if tries == CUT_TRIES:
            break
        left = buf[max(0, cut - CUT_CONTEXT) : cut].decode("utf-8", errors="replace")
        right = buf[cut : cut + CUT_CONTEXT].decode("utf-8", errors="replace")
        if cut_ok(left, right):
            return cut
    return -1


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
        if f.is_table:
            taken = 0
            for unit in table_units(0, f, text_key):
                if taken >= per_file:
                    break
                if unit.data:
                    taken += len(unit.data)
                    yield unit.data.decode("utf-8", errors="replace")
            continue
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


def table_units(index: int, f: InputFile, text_key: str) -> Iterator[Unit]:
    """One unit per row of a Parquet or Arrow file: its text column's UTF-8 bytes, or None
    and the reason (no such column, not a string column, a null)."""
    pa = _pyarrow()
    row = 0
    try:
        for num_rows, column, names in _text_columns(f, text_key):
            problem, values = "", None
            if column is None:
                problem = f"no column {text_key!r} (columns: {', '.join(names) or 'none'})"
            elif _is_string(pa, column.type):
                # as binary: each value's bytes, decoded (and checked) by the workers
                values = column.cast(pa.large_binary()).to_pylist()
            else:
                problem = f"column {text_key!r} holds {column.type}, not strings"
            for i in range(num_rows):
                data = values[i] if values is not None else None
                why = problem or (f"column {text_key!r} is null" if data is None else "")
                yield Unit(index, row + i, data, True, why)
            row += num_rows
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{f.label}: cannot read as {f.kind}: {exc}") from None


def _text_columns(f: InputFile, text_key: str):
    """(rows, the text column of those rows or None, the file's column names) for each
    batch of at most TABLE_BATCH_ROWS rows."""
    pa = _pyarrow()
    if f.kind == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(f.path) as pf:
            names = pf.schema_arrow.names
            if text_key not in names:  # row counts from the metadata, no data read
                for g in range(pf.num_row_groups):
                    yield pf.metadata.row_group(g).num_rows, None, names
                return
            for batch in pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[text_key]):
                yield batch.num_rows, batch.column(0), names
        return
    with pa.memory_map(str(f.path)) as source:  # the IPC file format, else the stream format
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        for batch in batches:
            names = batch.schema.names
            column = batch.column(names.index(text_key)) if text_key in names else None
            for start in range(0, batch.num_rows, TABLE_BATCH_ROWS):
                part = column.slice(start, TABLE_BATCH_ROWS) if column is not None else None
                yield min(TABLE_BATCH_ROWS, batch.num_rows - start), part, names


def _is_string(pa, kind) -> bool:
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or bool(is_view and is_view(kind))
    )


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
    except ImportError:
        raise DataError(
            "reading .parquet and .arrow inputs needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow
