"""The run directory: which run it belongs to, and the files the trainer writes into it.

run_dir/config.yaml       the resolved config (its hash is the run's identity)
run_dir/plan.txt          the stage plan the run trains
run_dir/tokenizer.model   the data's tokenizer in its own form (or tokenizer.json with its
                          tokenizer_config.json), so eval/export/generate need no data
run_dir/metrics.jsonl     (training.metrics)
run_dir/summary.json      the end-of-run summary
run_dir/train.log         rank 0's log lines, wandb's own output among them
run_dir/checkpoints/      (megapatch.checkpoint)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megapatch.checkpoint import CheckpointManager
from megapatch.config import RunConfig, load_config
from megapatch.data import load_tokenizer
from megapatch.errors import ConfigError

LOG_FILE = "train.log"


def check_run_dir(cfg: RunConfig, run_dir: Path, ckpt: CheckpointManager) -> None:
    """Refuse to mix runs: a run dir belongs to one config identity."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = load_config(saved)
        except ConfigError as exc:
            raise ConfigError(
                f"{saved} is not a readable megapatch config ({exc}); choose another run.dir"
            ) from exc
        if previous.config_hash() != cfg.config_hash():
            diff = "; ".join(cfg.identity_diff(previous)[:3])
            raise ConfigError(
                f"run.dir {run_dir} belongs to a different run (config hash {previous.config_hash()} "
                f"vs {cfg.config_hash()}: {diff}); choose another run.dir"
            )
    if cfg.train.resume == "none" and ckpt.complete_checkpoints():
        raise ConfigError(
            f"run.dir {run_dir} already has checkpoints in {ckpt.dir}: pass train.resume=auto to "
            "continue that run, or choose another run.dir (nothing was overwritten)"
        )


def write_run_files(cfg: RunConfig, run_dir: Path, plan, tokenizer_path: str | Path) -> None:
    """The files a run directory holds from the start (rank 0)."""
    cfg.save_resolved(run_dir)
    (run_dir / "plan.txt").write_text(plan.table() + "\n")
    # The run directory is self-contained: eval/export/generate find the tokenizer here,
    # as the data holds it (a tokenizer.json keeps its config files beside it).
    load_tokenizer(tokenizer_path).save(run_dir)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / "summary.json")
