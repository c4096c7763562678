"""`megapatch prep|plan|train|eval|export|generate|compare|bench|summary`.

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
    "export": ("megapatch.commands.export", "export a checkpoint as a Hugging Face Llama directory"),
    "generate": ("megapatch.commands.generate", "sample text from a checkpoint"),
    "compare": ("megapatch.commands.compare", "plot and tabulate several runs side by side"),
    "summary": ("megapatch.commands.summary", "summarise a finished run"),
    "bench": ("megapatch.commands.bench", "run a benchmark (data, ops, train)"),
}


def _load(name: str):
    module_name, _ = SUBCOMMANDS[name]
    return importlib.import_module(module_name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megapatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    try:
        args = build_parser(only=command).parse_args(argv)
    except ModuleNotFoundError as exc:  # a subcommand that is not built yet
        print(f"megapatch: error: command {command!r} is not available ({exc})", file=sys.stderr)
        return 2
    if args.command is None:
        build_parser().print_help()
        return 2
    from megapatch.logging_utils import setup_logging

    setup_logging()
    try:
        return int(_load(args.command).run(args) or 0)
    except MegapatchError as exc:
        print(f"megapatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megapatch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
