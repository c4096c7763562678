"""Shared pieces of the hardening tests: one uninterrupted DP=2 run that
the faulted runs are compared with, and readers of what a run leaves on disk."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.training.conftest import run_train

CHECKPOINT_STEPS = (3, 6, 8, 9, 12)  # TINY_OVERRIDES: every 3 steps, the switch (8), the end


@pytest.fixture(scope="session")
def reference_dp2(tiny_corpus, tmp_path_factory) -> Path:
    """One uninterrupted 2-process run (DP=2, ZeRO-1): 8 patch steps, then 4 token steps."""
    run_dir = tmp_path_factory.mktemp("reference-dp2") / "run"
    run_train(tiny_corpus, run_dir, nproc=2)
    return run_dir


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def model_states(run_dir: Path, step: int) -> dict:
    """DeepSpeed's model-states file of a checkpoint: "module" weights and client state."""
    path = step_dir(run_dir, step) / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_dirs(run_dir: Path) -> dict[str, bool]:
    """{step_XXXXXXXX: complete?} of a run's checkpoints directory."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    return {p.name: (p / "COMPLETE").is_file() for p in sorted(root.glob("step_*"))}


def latest_tag(run_dir: Path) -> str | None:
    path = Path(run_dir) / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (`megapatch train: error: ...`); fails if there is none."""
    lines = [
        line for line in proc.stderr.splitlines() if line.startswith("megapatch train: error:")
    ]
    assert len(lines) == 1, (
        f"expected one error line, got {lines}\n--- stderr tail ---\n{proc.stderr[-3000:]}"
    )
    return lines[0]


def assert_no_megapatch_traceback(stderr: str) -> None:
    """No Python traceback through megapatch's code (torchrun prints its own summary)."""
    frames = re.findall(r'File "[^"]*megapatch/[^"]*"', stderr)
    assert not frames, f"traceback through megapatch:\n{stderr[-3000:]}"


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`: to prove nothing was overwritten."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(Path(path).rglob("*"))
        if f.is_file()
    }
