"""Tokenizing chunks: decode, parse and tokenize one chunk (the worker side), and the
ordered, bounded parallel map over all chunks.

The same functions run in worker processes (`--workers N`) or in the main process
(`--workers 1`); a result depends only on its chunk, so the output is the same.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from data_prep.sources import LONE_SURROGATE, Chunk, InputFile
from megapatch.data.tokenizer import Tokenizer


@dataclass
class EncodeOptions:
    text_key: str = "text"
    strict: bool = False  # fail on a bad JSON line instead of skipping it
    utf8_errors: str = "error"  # or "replace": undecodable bytes become U+FFFD


@dataclass
class ChunkResult:
    index: int
    tokens: np.ndarray  # every kept unit's tokens, in order; EOS after each document's last
    pieces: list[tuple[int, bool]] = field(default_factory=list)  # (tokens, ends a document)
    skipped: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    error: str | None = None  # the first fatal problem in this chunk (in input order)


_state: dict = {}


def init_worker(tokenizer: Tokenizer, files: list[InputFile], options: EncodeOptions) -> None:
    _state.update(tokenizer=tokenizer, files=files, options=options)


def encode_chunk(chunk: Chunk) -> ChunkResult:
    tokenizer: Tokenizer = _state["tokenizer"]
    files: list[InputFile] = _state["files"]
    options: EncodeOptions = _state["options"]
    result = ChunkResult(chunk.index, np.empty(0, tokenizer.dtype), nbytes=chunk.nbytes)
    texts: list[str] = []
    doc_ends: list[bool] = []

    def skip(reason: str) -> None:
        result.skipped[reason] = result.skipped.get(reason, 0) + 1

    for unit in chunk.units:
        f = files[unit.file]
        per_line = f.kind == "jsonl"  # one document per unit, addressed by line or row
        if per_line and not unit.data.strip():
            continue  # blank line
        if f.is_table:
            where = f"{f.label}: row {unit.where}"
            if unit.data is None:
                if options.strict:
                    result.error = (
                        f"{where}: missing text: {unit.problem}; --text-key names the text "
                        "column (drop --strict to skip such rows)"
                    )
                    break
                skip("missing text")
                continue
        else:
            where = f"{f.label}:{unit.where}" if per_line else f.label
        text, error = _decode(
            unit.data, where, 0 if per_line or f.is_table else unit.where, options
        )
        if error:
            result.error = error
            break
        if unit.where == (1 if per_line else 0) and not f.is_table and text.startswith("\ufeff"):
            text = text[1:]  # a byte-order mark opening the file is not text
        if per_line:
            text, reason, detail = _json_text(text, options.text_key)
            if reason and options.strict:
                result.error = f"{where}: {reason}: {detail} (drop --strict to skip such lines)"
                break
            if reason:
                skip(reason)
                continue
        if per_line and LONE_SURROGATE.search(text):  # only JSON escapes can produce these
            if options.utf8_errors == "error":
                result.error = (
                    f"{where}: text holds a lone UTF-16 surrogate (invalid Unicode); pass "
                    "--utf8-errors replace to substitute U+FFFD"
                )
                break
            text = LONE_SURROGATE.sub("\ufffd", text)
        whole_document = per_line or f.is_table or unit.where == 0
        if not text and unit.doc_end and whole_document:
            skip("empty document")
            continue
        texts.append(text)
        doc_ends.append(unit.doc_end)
    # One call for the chunk: a Hugging Face tokenizer encodes a batch in one pass in Rust.
    eos = np.array([tokenizer.eos_id], dtype=tokenizer.dtype)
    parts: list[np.ndarray] = []
    for tokens, doc_end in zip(tokenizer.encode_batch(texts), doc_ends):
        parts.append(tokens)
        if doc_end:
            parts.append(eos)
        result.pieces.append((len(tokens) + doc_end, doc_end))
    if parts:
        result.tokens = np.concatenate(parts)
    return result


def _decode(data: bytes, where: str, offset: int, options: EncodeOptions) -> tuple[str, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        if options.utf8_errors == "replace":
            return data.decode("utf-8", errors="replace"), None
        return "", (
            f"{where}: invalid UTF-8 at byte {offset + exc.start}; pass --utf8-errors replace "
            "to substitute U+FFFD"
        )


def _json_text(line: str, key: str) -> tuple[str, str | None, str]:
    """(text, None, ""), or ("", reason, detail) with reason "bad JSON" or "missing text"."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return "", "bad JSON", str(exc)
    if not isinstance(obj, dict):
        return "", "bad JSON", f"a {type(obj).__name__}, expected an object"
    text = obj.get(key)
    if not isinstance(text, str):
        found = "no such key" if key not in obj else f"a {type(text).__name__}, not a string"
        return "", "missing text", f"field {key!r}: {found}; --text-key names the text field"
    return text, None, ""


class ChunkEncoder:
    """Encodes chunks in input order: in this process (1 worker) or in worker processes
    with at most 2 chunks per worker in flight, so memory stays bounded."""

    def __init__(
        self, workers: int, tokenizer: Tokenizer, files: list[InputFile], options: EncodeOptions
    ):
        self.workers = workers
        self.pool = None
        tokenizer.prepare()
        if workers == 1:
            init_worker(tokenizer, files, options)
            return
        # On Linux fork starts a worker in milliseconds (spawn re-imports the caller's main
        # module); the pool exists before any thread (the progress bar's) does.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        context = multiprocessing.get_context(method)
        self.pool = context.Pool(workers, init_worker, (tokenizer, files, options))

    def map(self, chunks: Iterable) -> Iterator[ChunkResult]:
        if self.pool is None:
            yield from map(encode_chunk, chunks)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self.pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
