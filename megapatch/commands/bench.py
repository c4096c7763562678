"""`megapatch bench NAME [ARGS...]`: run one of the benchmarks under bench/ of a checkout.

The benchmarks are scripts, not part of the installed package: each prints a table and
writes JSON under bench/results/. This command finds them next to the package (an
editable install or a source checkout) and passes the remaining arguments through.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from megapatch.errors import ConfigError

PASS_THROUGH = True  # everything after NAME belongs to the benchmark
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
BENCHMARKS = {
    "data": ("data.py", "tokenizer throughput, prep MB/s, loader tokens/s"),
    "ops": ("ops.py", "patch loss/embedding memory and time against the reference (CPU)"),
    "train": ("train.py", "tokens/s per phase side by side; --full: whole runs' wall time"),
    "gpu": ("gpu_check.sh", "the GPU check: Triton kernels in bf16, training MFU (needs CUDA)"),
    "repro-tiny": ("repro_tiny.py", "patch vs token arms at several budgets on the sample corpus"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        choices=sorted(BENCHMARKS),
        help="; ".join(f"{name}: {text}" for name, (_, text) in BENCHMARKS.items()),
    )
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="passed to the benchmark (see its --help)"
    )


def script_path(name: str) -> Path:
    script = BENCH_DIR / BENCHMARKS[name][0]
    if not script.is_file():
        raise ConfigError(
            f"{script} not found: `megapatch bench` runs the scripts of a source checkout "
            "(pip install -e . from a clone of the repository)"
        )
    return script


def run(args: argparse.Namespace) -> int:
    script = script_path(args.name)
    interpreter = ["bash"] if script.suffix == ".sh" else [sys.executable]
    return subprocess.run([*interpreter, str(script), *args.args], cwd=BENCH_DIR.parent).returncode
