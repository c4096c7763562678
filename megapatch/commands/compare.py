"""`megapatch compare RUN_DIR... --out DIR`: plots and a table of several runs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="directory for the PNG plots and table.md")
    parser.add_argument("--names", nargs="*", help="labels for the runs (default: directory names)")


def run(args: argparse.Namespace) -> int:
    from megapatch.errors import MegapatchError
    from megapatch.report import compare

    if args.names and len(args.names) != len(args.run_dirs):
        raise MegapatchError(
            f"--names: got {len(args.names)} names for {len(args.run_dirs)} runs; expected one each"
        )
    result = compare(args.run_dirs, args.out, args.names)
    print(result["table"], end="")
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0
