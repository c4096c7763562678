"""`megapatch eval RUN_OR_CHECKPOINT [--data DIR] [--split valid]`: token-level loss and
perplexity on held-out shards, in non-overlapping windows of the model's context."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

CHECKPOINT_HELP = (
    "a run directory (its latest complete checkpoint), its checkpoints directory, or a "
    "step_XXXXXXXX checkpoint; saved with any TP size and ZeRO stage"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--data", help="a `megapatch prep` output directory (default: the run's validation data)"
    )
    parser.add_argument("--split", default="valid", help="split to evaluate (default: valid)")
    parser.add_argument(
        "--max-windows", type=int, help="evaluate an evenly spaced subset of this many windows"
    )
    parser.add_argument("--micro-batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument(
        "--out", help="JSON result file (default: <run dir>/eval/<step>.<split>.json)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def evaluate_checkpoint(
    ckpt,
    *,
    data: str | os.PathLike | list | None = None,
    split: str = "valid",
    max_windows: int | None = None,
    micro_batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Mean token-level loss of a LoadedCheckpoint over the eval windows of `data`."""
    import torch

    from megapatch.checkpoint.full_weights import build_model
    from megapatch.data import eval_windows, open_corpus
    from megapatch.errors import ConfigError, DataError
    from megapatch.training.evaluate import perplexity, windowed_loss

    if micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size {micro_batch_size}: expected an integer ≥ 1")
    spec = data if data is not None else _valid_data_of(ckpt)
    corpus = open_corpus(spec, split=split)
    cfg = ckpt.model_config
    # A model may have more rows than its tokenizer has pieces (model.vocab_size set above
    # the tokenizer's, as training allows); fewer cannot score the data.
    if corpus.vocab_size > cfg.vocab_size:
        raise DataError(
            f"{spec}: tokenized with a vocabulary of {corpus.vocab_size} but checkpoint "
            f"{ckpt.path} has {cfg.vocab_size}: evaluate on data prepped with the model's tokenizer"
        )
    tokenizer = ckpt.tokenizer_path()
    if tokenizer is not None:
        ours = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
        if ours != corpus.tokenizer_sha256:
            raise DataError(
                f"{spec}: tokenized with {corpus.tokenizer_path}, which differs from the "
                f"checkpoint's tokenizer {tokenizer}: evaluate on data prepped with the model's tokenizer"
            )
    windows = eval_windows(corpus, cfg.seq_len, max_windows=max_windows)  # [n, L+1]
    model = build_model(ckpt, device)
    loss, tokens = windowed_loss(
        model,
        windows,
        patch_size=1,
        micro_batch_size=micro_batch_size,
        device=torch.device(device),
    )
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "data": spec if isinstance(spec, list) else str(spec),
        "split": split,
        "seq_len": cfg.seq_len,
        "windows": int(len(windows)),
        "tokens": tokens,
        "loss": loss,
        "ppl": perplexity(loss),
    }


def _valid_data_of(ckpt):
    from megapatch.errors import CheckpointError

    data = ckpt.run_config.get("data", {})
    spec = data.get("valid_path") or data.get("path") or data.get("blend")
    if not spec:
        raise CheckpointError(f"{ckpt.path}: the run config names no data; pass --data")
    return spec


def run(args: argparse.Namespace) -> int:
    from megapatch.checkpoint.full_weights import read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    result = evaluate_checkpoint(
        ckpt,
        data=args.data,
        split=args.split,
        max_windows=args.max_windows,
        micro_batch_size=args.micro_batch_size,
        device=args.device,
    )
    out = Path(args.out) if args.out else None
    if out is None and ckpt.run_dir is not None:
        out = ckpt.run_dir / "eval" / f"{ckpt.path.name}.{args.split}.json"
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        _write_atomic(out, text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
