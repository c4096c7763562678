"""Checkpoints: DeepSpeed saves weights and optimizer state; we add what it does not.

Layout of a checkpoint directory::

    checkpoints/
      step_00000100/                 one checkpoint (a DeepSpeed tag)
        mp_rank_00_model_states.pt   ... written by DeepSpeed (client state inside)
        megapatch/rank_00000.pt      per-rank state DeepSpeed does not keep (RNG)
        COMPLETE                     written last, after every rank finished
      latest                         the newest complete tag, replaced atomically

A checkpoint without COMPLETE is never loaded (a kill mid-save leaves one behind) and
is removed when a run resumes. A tag is never written over: saving a step that already
has a complete checkpoint is a no-op, so a failed save cannot damage a good one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megapatch import faults
from megapatch.errors import CheckpointError
from megapatch.logging_utils import get_logger

log = get_logger("checkpoint")

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class CheckpointInfo:
    tag: str
    step: int
    path: Path


class CheckpointManager:
    """Saves and finds checkpoints in one directory. All ranks call save/load together."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = keep_last

    # -- finding ---------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[CheckpointInfo]:
        if not self.dir.is_dir():
            return []
        found = []
        for child in self.dir.iterdir():
            m = TAG_PATTERN.match(child.name)
            if m and child.is_dir() and (child / COMPLETE).is_file():
                found.append(CheckpointInfo(child.name, int(m.group(1)), child))
        return sorted(found, key=lambda c: c.step)

    def incomplete_checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(
            c for c in self.dir.iterdir()
            if TAG_PATTERN.match(c.name) and c.is_dir() and not (c / COMPLETE).is_file()
        )

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint `latest` names if it is complete, else the newest complete one."""
        complete = self.complete_checkpoints()
        latest_file = self.dir / LATEST
        if latest_file.is_file():
            tag = latest_file.read_text().strip()
            for c in complete:
                if c.tag == tag:
                    return c
            log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest_file, tag)
        return complete[-1] if complete else None

    def remove_incomplete(self) -> None:
        """Delete checkpoints a killed save left behind (rank 0, at start-up only)."""
        if _is_rank0():
            for path in self.incomplete_checkpoints():
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
                shutil.rmtree(path, ignore_errors=True)
        _barrier()

    # -- saving ----------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Save a complete checkpoint for `step`; returns its directory."""
        tag = tag_for_step(step)
        path = self.dir / tag
        # Every rank must agree on whether to save: rank 0 decides from the filesystem.
        exists = torch.tensor([1 if (path / COMPLETE).is_file() else 0])
        if dist.is_initialized():
            dist.broadcast(exists, src=0)
        if exists.item():
            log.info("checkpoint %s already complete; not written again", path)
            return path
        try:
            if _is_rank0():
                if path.exists():  # an interrupted earlier attempt at this step
                    shutil.rmtree(path)
                self.dir.mkdir(parents=True, exist_ok=True)
            _barrier()
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            rank_dir = path / "megapatch"
            rank_dir.mkdir(parents=True, exist_ok=True)
            rank = dist.get_rank() if dist.is_initialized() else 0
            tmp = rank_dir / f".rank_{rank:05d}.pt.tmp"
            torch.save({"rng": rng_state(), **rank_state}, tmp)
            os.replace(tmp, rank_dir / f"rank_{rank:05d}.pt")
            faults.maybe_kill_in_save(step)
        except OSError as exc:
            raise CheckpointError(
                f"could not write checkpoint {path}: {exc.strerror or exc}; "
                f"earlier checkpoints are untouched (latest: {self._latest_tag_text()})"
            ) from exc
        _barrier()
        if _is_rank0():
            _atomic_write_text(path / COMPLETE, f"{step}\n")
            _atomic_write_text(self.dir / LATEST, tag + "\n")
            self._prune(keep=tag)
        _barrier()
        log.info("saved checkpoint %s", path)
        return path

    def _latest_tag_text(self) -> str:
        latest = self.latest()
        return latest.tag if latest else "none"

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        complete = self.complete_checkpoints()
        for c in complete[: max(0, len(complete) - self.keep_last)]:
            if c.tag != keep:
                # Drop COMPLETE first so a crash mid-delete leaves an "incomplete" dir, not a broken "complete" one.
                (c.path / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(c.path, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------
    def load(self, engine, checkpoint: CheckpointInfo, load_optimizer: bool = True) -> tuple[dict, dict]:
        """Load weights/optimizer into `engine`; returns (client_state, this rank's state)."""
        try:
            _, client_state = engine.load_checkpoint(
                str(checkpoint.path.parent),
                tag=checkpoint.tag,
                load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=False,
                load_module_strict=True,
            )
        except (RuntimeError, KeyError, FileNotFoundError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"checkpoint {checkpoint.path} does not match this model or parallel layout: {first}"
            ) from exc
        if client_state is None:
            raise CheckpointError(f"checkpoint {checkpoint.path} could not be read by DeepSpeed")
        rank = dist.get_rank() if dist.is_initialized() else 0
        rank_file = checkpoint.path / "megapatch" / f"rank_{rank:05d}.pt"
        rank_state: dict[str, Any] = {}
        if rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
            set_rng_state(rank_state["rng"])
        else:
            log.warning("%s missing (different world size?); RNG not restored on rank %d", rank_file, rank)
        return client_state, rank_state
