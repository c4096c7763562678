"""Rank-aware logging: library code logs through `logging`; only rank 0 speaks by default."""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "megapatch"


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 outside a distributed job)."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        return self.all_ranks or global_rank() == 0


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def setup_logging(level: str | int = "INFO", all_ranks: bool = False) -> None:
    """Configure the megapatch logger once (the CLI calls this)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        prefix = f"[rank {global_rank()}] " if all_ranks else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
        )
        handler.addFilter(_RankFilter(all_ranks))
        logger.addHandler(handler)
        logger.propagate = False
