"""Shared by the engine and hardening tests: a way to run `megapatch train` on the tiny
corpus (the `tiny_corpus` fixture, tests/conftest.py) in real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import REPO, metrics, spawned_training_env, train_records

__all__ = [
    "REPO",
    "TINY_OVERRIDES",
    "metrics",
    "run_train",
    "train_cmd",
    "train_env",
    "train_records",
]

# A model small enough that a 12-step run takes seconds: K=4, lambda=2/3 gives 8 patch
# steps (4 sequences of 64 tokens) then 4 token steps (16 sequences of 16 tokens).
TINY_OVERRIDES = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.ffn_hidden=64",
    "model.seq_len=16",
    "model.make_vocab_size_divisible_by=8",
    "train.tokens_per_step=256",
    "train.total_tokens=3072",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.precision=fp32",
    "parallel.zero_stage=1",
    "checkpoint.interval=3",
    "checkpoint.keep_last=null",
    "eval.interval=4",
    "eval.max_windows=8",
    "logging.interval=1",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
    "data.num_workers=1",
]


def train_env(*overrides: str, **extra: str) -> dict[str, str]:
    """The environment of a training process (it records the CRC of each step's data)."""
    return spawned_training_env(*overrides, MEGAPATCH_RECORD_DATA_CRC="1", **extra)


def train_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megapatch", "train"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "megapatch",
        "train",
    ]


def run_train(
    corpus: Path,
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    env: dict | None = None,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`megapatch train configs/tiny.yaml` shrunk by TINY_OVERRIDES, in real processes."""
    args = train_cmd(nproc) + [
        str(REPO / "configs" / "tiny.yaml"),
        *TINY_OVERRIDES,
        f"data.path={corpus}",
        f"run.dir={run_dir}",
        *overrides,
    ]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=train_env(*overrides, **(env or {})),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def reference_run(tiny_corpus, tmp_path_factory):
    """One uninterrupted single-process run that other tests compare against (one xdist
    worker runs every test that asks for it: tests/conftest.py ONE_WORKER_GROUPS)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(tiny_corpus, run_dir)
    return run_dir
