"""`prepare(config)`: corpus → tokenizer → train/valid shards → manifest, atomically.

Everything is written into a hidden staging directory inside the output directory and
moved into place at the end, the manifest last; a failed prep removes its staging
directory, so the output holds either the previous prep or the complete new one.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

import megapatch
from data_prep import megatron
from data_prep.encode import ChunkEncoder, EncodeOptions
from data_prep.megatron import open_megatron
from data_prep.output import _is_valid, close_all, commit_staging, split_writers
from data_prep.sample import fetch_sample, get_sample
from data_prep.sources import InputFile, read_chunks, resolve_inputs, sample_documents
from data_prep.train_tokenizer import train_tokenizer
from megapatch.data.corpus import Corpus
from megapatch.data.hf_tokenizer import train_bpe
from megapatch.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    prep_files,
    read_manifest,
    write_manifest,
)
from megapatch.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from megapatch.errors import ConfigError, DataError, MegapatchError
from megapatch.logging_utils import get_logger

log = get_logger("prep")

DEFAULT_VALID_FRACTION = 0.01
TOKENIZER_TYPES = ("sentencepiece", "bpe")  # what --tokenizer-type trains


@dataclass
class PrepConfig:
    out: str
    inputs: list[str] = field(default_factory=list)
    sample: str | None = None  # a built-in corpus instead of inputs
    vocab_size: int | None = None  # train a tokenizer of this size ...
    tokenizer: str | None = None  # ... or use this one (.model, tokenizer.json, HF dir)
    tokenizer_type: str = "sentencepiece"  # what is trained: sentencepiece BPE or byte-level "bpe"
    from_megatron: list[str] = field(default_factory=list)  # convert these shards instead
    text_key: str = "text"
    valid_fraction: float | None = None  # None: the sample's choice, else 0.01
    shard_tokens: int = 1 << 30
    tokenizer_sample_mb: float = 64.0
    utf8_errors: str = "error"
    strict: bool = False
    workers: int = 1
    overwrite: bool = False
    skip_existing: bool = False
    progress: bool = True
    chunk_bytes: int = 1 << 18


@dataclass
class PrepResult:
    out: Path
    skipped_existing: bool = False
    num_tokens: dict[str, int] = field(default_factory=dict)
    num_documents: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    seconds: float = 0.0


def prepare(config: PrepConfig) -> PrepResult:
    """Run a prep; see the module docstring for the guarantees on failure."""
    config = _resolve_defaults(config)
    out = Path(config.out)
    files = None if config.sample or config.from_megatron else resolve_inputs(config.inputs)
    identity = _identity(config, files)

    if out.exists() and not out.is_dir():
        raise DataError(f"output path {out} exists and is not a directory")
    existing = prep_files(out)
    if existing:
        state = _existing_prep_state(out, identity)
        if config.skip_existing and state == "same":
            manifest = read_manifest(out)
            return PrepResult(
                out,
                skipped_existing=True,
                num_tokens={k: v["num_tokens"] for k, v in manifest["splits"].items()},
                num_documents={k: v["num_documents"] for k, v in manifest["splits"].items()},
            )
        if not config.overwrite:
            held = {
                "same": "this prep (--skip-existing keeps it)",
                "different": "a prep made with other arguments",
                "incomplete": "an incomplete or damaged prep",
            }[state]
            raise DataError(
                f"{out} already holds {held}: {len(existing)} files such as "
                f"{existing[0].name}; pass --overwrite to replace it"
            )
    if config.sample:
        files = _sample_files(config.sample)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prep-", dir=out))
    try:
        if config.from_megatron:
            result = _convert_into(staging, config, identity)
        else:
            result = _prepare_into(staging, config, files, identity)
        commit_staging(staging, out, replace=existing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    result.out = out
    return result


def _resolve_defaults(config: PrepConfig) -> PrepConfig:
    c = PrepConfig(**asdict(config))
    if c.from_megatron:
        if c.inputs or c.sample:
            raise ConfigError("--from-megatron converts shards: pass no INPUTs and no --sample")
        if c.tokenizer is None:
            raise ConfigError(
                "--from-megatron needs --tokenizer PATH: the tokenizer the shards were made with "
                "(its EOS ends each document; its vocabulary must hold every id)"
            )
    elif c.sample:
        sample = get_sample(c.sample)
        if c.inputs:
            raise ConfigError("pass input paths or --sample, not both")
        if c.vocab_size is None and c.tokenizer is None:
            c.vocab_size = sample.vocab_size
        if c.valid_fraction is None:
            c.valid_fraction = sample.valid_fraction
    elif not c.inputs:
        raise ConfigError("no inputs: pass files, directories or globs, or --sample NAME")
    if c.valid_fraction is None:
        c.valid_fraction = DEFAULT_VALID_FRACTION
    if (c.vocab_size is None) == (c.tokenizer is None) and not c.from_megatron:
        raise ConfigError(
            "pass --vocab-size N to train a tokenizer or --tokenizer PATH to use one (not both)"
        )
    if not (0.0 <= c.valid_fraction < 1.0) or math.isnan(c.valid_fraction):
        raise ConfigError(f"--valid-fraction must be in [0, 1), got {c.valid_fraction}")
    if c.vocab_size is not None and c.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be positive, got {c.vocab_size}")
    if c.workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {c.workers}")
    if c.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be ≥ 1, got {c.shard_tokens}")
    if c.tokenizer_sample_mb <= 0:
        raise ConfigError(f"--tokenizer-sample-mb must be positive, got {c.tokenizer_sample_mb}")
    if c.tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(
            f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got {c.tokenizer_type!r}"
        )
    if c.utf8_errors not in ("error", "replace"):
        raise ConfigError(f"--utf8-errors must be error or replace, got {c.utf8_errors!r}")
    return c


def _identity(config: PrepConfig, files: list[InputFile] | None) -> dict:
    """The prep arguments that decide the output (recorded in the manifest)."""
    tokenizer = None
    if config.tokenizer:
        tok = load_tokenizer(config.tokenizer)
        tokenizer = {"sha256": tok.sha256}
        if tok.kind != "sentencepiece":  # its EOS may come from a config file beside it
            tokenizer["eos_id"] = tok.eos_id
    if config.from_megatron:
        shards = [open_megatron(p) for p in config.from_megatron]
        return {
            "from_megatron": [{"path": s.prefix, "bytes": s.num_bytes} for s in shards],
            "tokenizer": tokenizer,
            "valid_fraction": config.valid_fraction,
            "shard_tokens": config.shard_tokens,
        }
    identity = {
        "sample": get_sample(config.sample).requirement if config.sample else None,
        "inputs": [{"path": f.label, "bytes": f.size} for f in files] if files else None,
        "vocab_size": config.vocab_size,
        "tokenizer": tokenizer,
        "text_key": config.text_key,
        "valid_fraction": config.valid_fraction,
        "shard_tokens": config.shard_tokens,
        "tokenizer_sample_mb": config.tokenizer_sample_mb,
        "utf8_errors": config.utf8_errors,
        "strict": config.strict,
    }
    if config.vocab_size is not None and config.tokenizer_type != "sentencepiece":
        identity["tokenizer_type"] = config.tokenizer_type  # absent: older preps stay "same"
    return identity


def _existing_prep_state(out: Path, identity: dict) -> str:
    """What `out` holds: "same" (a complete prep made with these arguments), "different"
    (one made with other arguments) or "incomplete" (damaged, or no manifest)."""
    try:
        manifest = read_manifest(out)
        for split, info in manifest["splits"].items():
            if info["shards"]:
                Corpus(out, split)  # checks every shard's sizes and the tokenizer hash
    except MegapatchError:
        return "incomplete"
    return "same" if manifest.get("prep_args") == identity else "different"


def _sample_files(name: str) -> list[InputFile]:
    sample = get_sample(name)
    return [
        InputFile(p, "text", p.stat().st_size, f"{sample.requirement}:{p.name}")
        for p in fetch_sample(name)
    ]


def _prepare_into(
    staging: Path, config: PrepConfig, files: list[InputFile], identity: dict
) -> PrepResult:
    started = time.perf_counter()
    tokenizer = _get_tokenizer(config, files)
    tokenizer.save(staging)
    if tokenizer.eos_id < 0:
        raise DataError(f"{config.tokenizer}: the tokenizer defines no EOS piece to end documents")

    shards, skipped, num_docs, input_bytes = _tokenize(staging, config, files, tokenizer)
    if num_docs == 0:
        detail = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "all inputs are empty"
        raise DataError(f"no documents in the {len(files)} input files ({detail})")
    if skipped:
        log.warning("skipped %s", ", ".join(f"{v} lines: {k}" for k, v in sorted(skipped.items())))
    sources = [{"path": f.label, "bytes": f.size} for f in files]
    trained = config.tokenizer is None
    return _finish(
        staging, tokenizer, trained, shards, sources, skipped, identity, input_bytes, started
    )


def _finish(
    staging, tokenizer, trained, shards, sources, skipped, identity, input_bytes, started, **extra
) -> PrepResult:
    """Write the manifest of the shards in `staging`; the result."""
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "dtype": tokenizer.dtype.name,
        "tokenizer": tokenizer_entry(tokenizer, trained=trained),
        "splits": {
            s: {
                "num_tokens": sum(x["num_tokens"] for x in shards[s]),
                "num_documents": sum(x["num_documents"] for x in shards[s]),
                "shards": shards[s],
            }
            for s in ("train", "valid")
        },
        "sources": sources,
        "skipped": dict(sorted(skipped.items())),
        "prep_args": identity,
        **extra,
        "megapatch_version": megapatch.__version__,
    }
    write_manifest(staging, manifest)
    return PrepResult(
        staging,
        num_tokens={s: manifest["splits"][s]["num_tokens"] for s in shards},
        num_documents={s: manifest["splits"][s]["num_documents"] for s in shards},
        skipped=dict(skipped),
        input_bytes=input_bytes,
        seconds=time.perf_counter() - started,
    )


def _convert_into(staging: Path, config: PrepConfig, identity: dict) -> PrepResult:
    """`--from-megatron`: the shards' token ids into megapatch shards (data_prep.megatron)."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.tokenizer)
    tokenizer.save(staging)
    shards = [open_megatron(p) for p in config.from_megatron]
    megatron.check_ids(shards, tokenizer, config.progress)
    with split_writers(staging, tokenizer.dtype, config.shard_tokens) as writers:
        num_docs, zero_copy = megatron.convert(
            shards, writers, tokenizer, config.valid_fraction, config.progress
        )
        written = close_all(writers)
    if num_docs == 0:
        raise DataError(f"no documents in {', '.join(config.from_megatron)}")
    sources = [{"path": s.prefix, "bytes": s.num_bytes} for s in shards]
    input_bytes = sum(s.bin_path.stat().st_size for s in shards)
    log.info("converted %d documents (%s)", num_docs, "zero-copy" if zero_copy else "rewritten")
    return _finish(
        staging, tokenizer, False, written, sources, {}, identity, input_bytes, started,
        megatron={"zero_copy": zero_copy},
    )  # fmt: skip


def _tokenize(
    staging: Path, config: PrepConfig, files: list[InputFile], tokenizer: Tokenizer
) -> tuple[dict[str, list[dict]], dict[str, int], int, int]:
    """Tokenize every input into the split writers: (shards, skipped, documents, bytes)."""
    options = EncodeOptions(config.text_key, config.strict, config.utf8_errors)
    skipped: dict[str, int] = {}
    doc_index = 0  # documents started so far
    tokens_done, input_bytes, started = 0, 0, time.perf_counter()
    total = None if any(f.compressed for f in files) else sum(f.size for f in files)
    # Text files are cut between words; where pieces may span words, only at cuts the
    # tokenizer itself encodes the same apart as together.
    cut_ok = None if tokenizer.words_are_independent else tokenizer.cut_is_exact
    chunks = read_chunks(files, config.chunk_bytes, config.text_key, cut_ok)
    with split_writers(staging, tokenizer.dtype, config.shard_tokens) as writers:
        writer = writers["train"]
        with ChunkEncoder(config.workers, tokenizer, files, options) as encoder, tqdm(
            total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
            disable=not config.progress, dynamic_ncols=True,
        ) as bar:  # fmt: skip
            for result in encoder.map(chunks):
                if result.error:
                    raise DataError(result.error)
                offset = 0
                for n, doc_end in result.pieces:
                    if not writer.in_document:  # a new document: route it to its split
                        valid = _is_valid(doc_index, config.valid_fraction)
                        writer = writers["valid" if valid else "train"]
                        doc_index += 1
                    writer.add_tokens(result.tokens[offset : offset + n])
                    offset += n
                    if doc_end:
                        writer.end_document()
                for reason, count in result.skipped.items():
                    skipped[reason] = skipped.get(reason, 0) + count
                tokens_done += len(result.tokens)
                input_bytes += result.nbytes
                rate = tokens_done / max(1e-9, time.perf_counter() - started)
                bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
                bar.update(result.nbytes)
        shards = close_all(writers)
    return shards, skipped, doc_index, input_bytes


def _get_tokenizer(config: PrepConfig, files: list[InputFile]) -> Tokenizer:
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
        if tokenizer.kind == "sentencepiece" and not tokenizer.words_are_independent:
            log.info(
                "%s: pieces may span words; encoding whole documents (slower)", config.tokenizer
            )
        return tokenizer
    budget = int(config.tokenizer_sample_mb * 1e6)
    log.info(
        "training a %d-token %s tokenizer on up to %.0f MB sampled from %d files",
        config.vocab_size,
        "sentencepiece BPE" if config.tokenizer_type == "sentencepiece" else "byte-level BPE",
        budget / 1e6,
        len(files),
    )
    docs = [d for d in sample_documents(files, config.text_key, budget) if d]
    if not docs:
        raise DataError(
            f"no text to train the tokenizer on: the {len(files)} input files hold no documents"
        )
    if config.tokenizer_type == "bpe":
        return train_bpe(docs, config.vocab_size)
    model = train_tokenizer(docs, config.vocab_size)
    tokenizer = SentencePieceTokenizer(model, source=SentencePieceTokenizer.file_name)
    if not tokenizer.words_are_independent:  # not expected; only slower
        log.warning("the trained tokenizer has pieces spanning words; encoding will be slower")
    return tokenizer


def tokenizer_entry(tokenizer: Tokenizer, trained: bool) -> dict:
    """The manifest's record of the tokenizer."""
    return {
        "file": tokenizer.file_name,
        "type": tokenizer.kind,
        "files": list(tokenizer.files()),
        "sha256": tokenizer.sha256,
        "trained": trained,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id,
    }
