"""Shared by the launch tests: a tiny run config (of the `tiny_corpus` fixture,
tests/conftest.py) and the environment the launch scripts run in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fixtures import REPO, SPAWNED_TRAINING_ENV, train_records

LAUNCH = REPO / "launch"
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")

# configs/tiny.yaml shrunk until a run is mostly process start-up: K=4 and lambda=2/3 give
# 4 patch steps (8 sequences of 64 tokens) then 2 token steps (32 sequences of 16 tokens).
TINY_OVERRIDES = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.ffn_hidden=64",
    "model.seq_len=16",
    "model.make_vocab_size_divisible_by=8",
    "train.tokens_per_step=512",
    "train.total_tokens=3072",
    "train.micro_batch_size=4",
    "train.warmup_steps=1",
    "train.precision=fp32",
    "checkpoint.interval=2",
    "checkpoint.keep_last=null",
    "eval.interval=0",
    "eval.max_windows=4",
    "logging.interval=1",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a user who installed megapatch into this interpreter (plus
    what every spawned training process of the tests gets)."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        PYTHONPATH=f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO),
        **SPAWNED_TRAINING_ENV,
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def run_script(*argv: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 300):
    return subprocess.run(
        ["bash", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or script_env(),
        timeout=timeout,
    )


def find_tool(name: str) -> str | None:
    """A command on PATH or installed next to this interpreter (a venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def train_losses(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, phase, loss) of every logged optimizer step."""
    return [(r["step"], r["phase"], r["loss"]) for r in train_records(run_dir)]
