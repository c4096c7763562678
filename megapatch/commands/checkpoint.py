"""`megapatch checkpoint reshard CKPT --out DIR [--tp N] [--pp N] [--dp N] [--zero-stage N]`:
a checkpoint of one parallel layout made resumable in another, ahead of a job.

The output is DeepSpeed's universal form (one folder per parameter: whole fp32 weight,
both Adam moments, step), which any layout loads (each folder answers to the GPT's name
and the pipeline's); `--tp/--pp/--dp/--zero-stage` name the
layout the next job will use, so a layout the model cannot take is refused before any
work. Resume it with `train.resume=DIR`. Without --out it goes beside the checkpoint
(`step_XXXXXXXX.universal`), where `train.resume=auto` finds and reuses it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megapatch.commands.evaluate import CHECKPOINT_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # A plain positional, not subparsers: the CLI parses options intermixed with positionals.
    parser.add_argument(
        "action", choices=["reshard"], help="reshard: convert for another TP/PP/DP/ZeRO layout"
    )
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--out", help="output directory, new (default: STEP_DIR.universal beside the checkpoint)"
    )
    parser.add_argument("--tp", type=int, help="the TP size it will be resumed with")
    parser.add_argument("--pp", type=int, help="the pipeline size it will be resumed with")
    parser.add_argument("--dp", type=int, help="the DP size it will be resumed with")
    parser.add_argument("--zero-stage", type=int, help="the ZeRO stage it will be resumed with")
    parser.add_argument(
        "--workers", type=int, help="converter processes (default: up to 4, the CPUs)"
    )


def run(args: argparse.Namespace) -> int:
    from megapatch.checkpoint.client_state import read_client_state
    from megapatch.checkpoint.full_weights import find_checkpoint
    from megapatch.checkpoint.reshard import (
        Layout,
        bar_wanted,
        check_can_reshard,
        convert,
        default_workers,
        is_universal,
        universal_dir,
    )
    from megapatch.errors import CheckpointError

    step_dir = find_checkpoint(args.checkpoint)
    if is_universal(step_dir):
        raise CheckpointError(f"{step_dir} is already a universal checkpoint: resume it directly")
    client = read_client_state(step_dir)
    saved = Layout.of(client.identity)
    flags = (("--tp", args.tp), ("--pp", args.pp), ("--dp", args.dp))
    for flag, value in (*flags, ("--zero-stage", args.zero_stage)):
        if value is not None and value < (0 if flag == "--zero-stage" else 1):
            raise CheckpointError(f"{flag} {value}: expected a positive number")
    target = Layout(
        args.tp or saved.tp,
        args.dp or saved.dp,
        saved.zero if args.zero_stage is None else args.zero_stage,
        args.pp or saved.pp,
    )
    check_can_reshard(step_dir, saved, target, client.model_config)
    out = Path(args.out) if args.out else universal_dir(step_dir)
    workers = args.workers or default_workers()
    result = convert(
        step_dir,
        out,
        step=client.step,
        model_config=client.model_config,
        workers=workers,
        bar=bar_wanted(),
    )
    if result.reused:
        print(f"{out} already holds the universal form of {step_dir}; nothing to do")
    else:
        print(
            f"resharded {step_dir} ({saved}) for {target} in {result.seconds:.1f} s: {out} "
            f"({result.bytes / 1e6:.1f} MB); resume with train.resume={out}"
        )
    return 0
