"""`megapatch summary RUN_DIR`: the short report of a run (what quickstart prints last)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megapatch.errors import MegapatchError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `megapatch train`")
    parser.add_argument("--json", action="store_true", help="print the raw summary.json")


def _fmt_rate(value) -> str:
    return f"{value:,.0f} tok/s" if value else "-"


def run(args: argparse.Namespace) -> int:
    path = Path(args.run_dir) / "summary.json"
    if not path.is_file():
        raise MegapatchError(
            f"{path} not found: is {args.run_dir} a finished megapatch run directory?"
        )
    summary = json.loads(path.read_text())
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    lines = [f"run {args.run_dir}: {summary['status']} after {summary['global_step']} steps"]
    for phase, tokens in summary["tokens"].items():
        lines.append(
            f"  {phase:>5} phase: {tokens:,} tokens in {summary['wall_time_s'][phase]:.1f}s "
            f"({_fmt_rate(summary['tokens_per_s'].get(phase))})"
        )
    if summary.get("val_loss") is not None:
        lines.append(
            f"  final validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.2f})"
        )
    planned = summary.get("planned_cost_ratio")
    measured = summary.get("measured_cost_ratio")
    if planned is not None:
        text = f"  cost relative to token-only training: planned {planned:.3f}"
        if measured is not None:
            text += f", measured {measured:.3f} (wall time vs the token phase's speed)"
        lines.append(text)
    if summary.get("nonfinite_steps"):
        lines.append(f"  non-finite steps skipped: {summary['nonfinite_steps']}")
    print("\n".join(lines))
    return 0
