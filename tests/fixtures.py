"""Helpers several test packages share (the pytest fixtures built on them live in
tests/conftest.py): a tiny GPT config, a tiny prepped corpus, `megapatch` commands run in
this process, the environment of spawned training processes, and a run's metrics."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megapatch.cli import main as cli_main
from megapatch.logging_utils import LOGGER_NAME
from megapatch.model import GPTConfig
from tests.data.helpers import synthetic_text

REPO = Path(__file__).resolve().parents[1]


def tiny_gpt_config(**overrides) -> GPTConfig:
    """A GPT of two 32-wide layers with GQA (4 heads, 2 KV heads) and the float64-checked
    reference ops, small enough to compare exactly in milliseconds; override any field."""
    fields = dict(
        vocab_size=250,  # not a multiple of 128: the model pads to 256
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=48,
        seq_len=8,
        ops_backend="reference",
    )
    return GPTConfig(**{**fields, **overrides})


def run_cli(*argv) -> int:
    """`megapatch ARGV` in this process; returns the exit code.

    The CLI attaches a log handler to the stream stderr is at that moment; pytest swaps
    stderr per test, so the handler is removed again afterwards.
    """
    logger = logging.getLogger(LOGGER_NAME)
    handlers, propagate = list(logger.handlers), logger.propagate
    try:
        return cli_main([str(a) for a in argv])
    finally:
        for handler in logger.handlers[len(handlers) :]:
            logger.removeHandler(handler)
        logger.propagate = propagate


def write_texts(directory: Path, documents: int = 12, words: int = 2500) -> Path:
    """Synthetic documents (prose, numbers, non-ASCII) to prep."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (directory / f"doc{i:02d}.txt").write_text(synthetic_text(100 + i, words), "utf-8")
    return directory


def prep(texts: Path, out: Path, vocab_size: int = 400) -> Path:
    """A real `megapatch prep` output: a BPE tokenizer, train and valid (10%) shards."""
    code = run_cli(
        "prep", texts, "--vocab-size", vocab_size, "--valid-fraction", "0.1",
        "--workers", "1", "--no-progress", "--out", out,
    )  # fmt: skip
    assert code == 0, f"megapatch prep failed for {out}"
    return out


# What every spawned training process of the tests gets. TORCHDYNAMO_DISABLE: DeepSpeed's
# ZeRO optimizer check imports its Muon optimizer, whose @torch.compile decorators import
# torch's inductor, a quarter of a tiny run's CPU time; no spawned run compiles anything
# (train.compile is tested in-process, tests/model), and nothing else changes.
SPAWNED_TRAINING_ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "WANDB_MODE": "disabled",
    "TORCHDYNAMO_DISABLE": "1",
}


def spawned_training_env(*overrides: str, **extra: str) -> dict[str, str]:
    """This process's environment plus SPAWNED_TRAINING_ENV and `extra`, for a run with
    these config overrides (one that sets train.compile keeps torch.compile working)."""
    env = {**os.environ, **SPAWNED_TRAINING_ENV, **extra}
    if any(o.startswith("train.compile=") for o in overrides):
        env.pop("TORCHDYNAMO_DISABLE")
    return env


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_records(run_dir: Path) -> list[dict]:
    """One record per optimizer step (the final evaluation record excluded)."""
    return [r for r in metrics(run_dir) if "loss" in r]
