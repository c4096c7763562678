"""megapatch: patch-level pretraining of GPT-style language models.

Commands: prep, plan, train, eval, export, generate, checkpoint, compare, bench, summary.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported lazily so `megapatch --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megapatch.errors import MegapatchError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli", "tokenize a corpus into indexed shards (or fetch the sample corpus)"),
    "plan": ("megapatch.commands.plan", "print the phase plan, batch shapes and cost of a config"),
    "train": ("megapatch.commands.train", "pretrain through the patch and token phases"),
    "eval": ("megapatch.commands.evaluate", "token-level validation loss and perplexity"),
    "export": (
        "megapatch.commands.export",
        "export a checkpoint as a Hugging Face Llama directory",
    ),
    "generate": ("megapatch.commands.generate", "sample text from a checkpoint"),
    "checkpoint": (
        "megapatch.commands.checkpoint",
        "checkpoint tools: reshard for another TP/DP/ZeRO layout",
    ),
    "compare": ("megapatch.commands.compare", "plot and tabulate several runs side by side"),
    "summary": ("megapatch.commands.summary", "summarise a finished run"),
    "bench": ("megapatch.commands.bench", "run a benchmark (data, ops, train)"),
}


def _load(name: str):
    module_name, _ = SUBCOMMANDS[name]
    return importlib.import_module(module_name)


def _top_level_help() -> str:
    lines = ["usage: megapatch COMMAND [ARGS...]", "", __doc__.splitlines()[0], "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "`megapatch COMMAND --help` shows a command's arguments."]
    return "\n".join(lines)


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand; options may come before or after positionals."""
    _, help_text = SUBCOMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"megapatch {command}", description=help_text)
    _load(command).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    command = argv[0]
    if command not in SUBCOMMANDS:
        print(
            f"megapatch: error: unknown command {command!r}; expected one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as exc:  # an optional dependency of that command is missing
        print(f"megapatch {command}: error: {exc}", file=sys.stderr)
        return 2
    # intermixed: `megapatch plan CONFIG patch.size=2 --dp 8` works as users expect; a
    # command that passes its remaining arguments on (bench) parses them in order
    if getattr(_load(command), "PASS_THROUGH", False):
        args = parser.parse_args(argv[1:])
    else:
        args = parser.parse_intermixed_args(argv[1:])
    args.command = command
    from megapatch.logging_utils import setup_logging

    setup_logging()
    try:
        return int(_load(command).run(args) or 0)
    except MegapatchError as exc:
        print(f"megapatch {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megapatch {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
