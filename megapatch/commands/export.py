"""`megapatch export RUN_OR_CHECKPOINT --out DIR`: a Hugging Face LlamaForCausalLM
directory, merged from any TP size and ZeRO stage."""

from __future__ import annotations

import argparse

from megapatch.commands.evaluate import CHECKPOINT_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="output directory (must be empty or new)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (only on success)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights (default: float32)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the weights into safetensors shards of at most this size (default: 5GB)",
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer to ship: a sentencepiece .model, a tokenizer.json or a directory "
        "holding one (default: the run's)",
    )


def run(args: argparse.Namespace) -> int:
    from megapatch.checkpoint.full_weights import read_checkpoint
    from megapatch.checkpoint.hf import check_out_dir, export_hf

    check_out_dir(args.out, args.overwrite)  # refuse before the (slow) read
    ckpt = read_checkpoint(args.checkpoint)
    out = export_hf(
        ckpt,
        args.out,
        tokenizer_path=args.tokenizer,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"exported {ckpt.path} (step {ckpt.step}) to {out}")
    return 0
