"""What a run reports: metrics records, the progress bar, and a wandb run kept across resumes."""

from __future__ import annotations

import pytest

from tests.training.conftest import metrics, run_train

pytestmark = pytest.mark.slow

REQUIRED = {"step", "phase", "tokens", "loss", "lr", "tokens_per_s", "grad_norm"}


def test_metrics_progress_and_wandb_id_survive_a_resume(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = run_train(
        tiny_corpus,
        run_dir,
        "train.max_steps=2",
        "eval.interval=2",
        "logging.wandb_mode=offline",
        "logging.progress=true",
        env={"WANDB_MODE": "offline"},
    )
    records = metrics(run_dir)
    assert all(REQUIRED <= r.keys() for r in records)
    assert (
        records[1]["val_loss"] > 0 and records[1]["val_patch_loss"] > 0
    )  # patch phase: both levels
    assert "tok/s" in first.stderr and "patch loss" in first.stderr  # the progress
    # Off a terminal: plain lines at logging.interval (1 here) with an ETA, no bar updates.
    assert "\r" not in first.stderr
    assert "step 1/2 patch loss" in first.stderr and "step 2/2 patch loss" in first.stderr
    assert "ETA" in first.stderr
    # wandb's banner and run summary go to the run's log file, not to the terminal.
    assert "Run summary" not in first.stdout + first.stderr
    assert "wandb: " not in first.stdout + first.stderr
    assert "Run summary" in (run_dir / "train.log").read_text()
    run_id = (run_dir / "wandb_id").read_text().strip()

    run_train(
        tiny_corpus,
        run_dir,
        "train.max_steps=4",
        "eval.interval=2",
        "logging.wandb_mode=offline",
        env={"WANDB_MODE": "offline"},
    )
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
