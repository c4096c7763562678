"""Shared fixtures for engine tests: a small real corpus and a way to run `megapatch train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.helpers import synthetic_text

REPO = Path(__file__).resolve().parents[2]

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


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A real `megapatch prep` output: 12 synthetic documents, a 400-piece tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    texts = root / "texts"
    texts.mkdir()
    for i in range(12):
        (texts / f"doc{i:02d}.txt").write_text(synthetic_text(100 + i, 2500))
    out = root / "prep"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megapatch",
            "prep",
            str(texts),
            "--vocab-size",
            "400",
            "--valid-fraction",
            "0.1",
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return out


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MEGAPATCH_RECORD_DATA_CRC="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


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
        env=train_env(**(env or {})),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
        )
    return proc


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_records(run_dir: Path) -> list[dict]:
    """One record per optimizer step (the final evaluation record excluded)."""
    return [r for r in metrics(run_dir) if "loss" in r]
