"""Running a job: the trainer and the components it orchestrates.

    from megapatch.training import train, Trainer
    train(cfg)                                  # every rank calls this

Components, each owning its own rule: `schedule` (phases, batch shapes, LR; pure Python),
`engine` (the DeepSpeed engine and optimizer), `run_data` (phase streams, validation
windows), `evaluate` (windowed loss, what to evaluate when), `metrics` (records, logs,
wandb, summary), `run_dir` (the run directory's files), `preemption`.

Importing this package is cheap: `Trainer` and `train` (torch, DeepSpeed) load on first
use, so the launchers' preflight can use the scheduler without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train", "Trainer", "RunResult", "NonFiniteLossError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megapatch.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
