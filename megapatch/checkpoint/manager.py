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

A write that fails (disk full, read-only, permissions) is recorded rather than raised on
the rank that hit it, so every rank still walks through DeepSpeed's barriers; the ranks
then agree, the partial directory is removed, and every rank raises the same
CheckpointWriteError naming the directory and the cause. `latest` and the earlier
checkpoints are never touched by a failed save.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megapatch import faults
from megapatch.checkpoint.reshard import is_universal, slice_for_zero3_tensor_parallelism
from megapatch.checkpoint.safe_load import safe_load
from megapatch.errors import CheckpointError
from megapatch.logging_utils import get_logger

log = get_logger("checkpoint")

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; nothing of it was kept and earlier ones are intact."""


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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _describe(exc: BaseException) -> str:
    """'No space left on device: /ckpt/step_00000006/x.pt' from a failed write."""
    # torch.save's zip writer replaces the OSError of a failed write by its own RuntimeError
    # ("unexpected pos ..."), raised while the OSError is handled: find the OSError.
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return f"write failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
    reason = cause.strerror or str(cause) or type(cause).__name__
    return f"{reason}: {cause.filename}" if cause.filename else reason


def _attempt(write: Callable[[], object]) -> str | None:
    """Run a write; None if it worked, else what went wrong (one line)."""
    try:
        write()
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's report of a failed write
        return _describe(exc)
    return None


def _first_error(error: str | None) -> str | None:
    """The first rank's error, on every rank (None if no rank failed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"rank {_rank()}: {error}")
    return next((e for e in errors if e is not None), None)


def _from_rank0(value):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GuardedWrites:
    """DeepSpeed's checkpoint engine for one save, with failed writes recorded, not raised.

    An exception on one rank inside `save_checkpoint` would skip DeepSpeed's barriers there
    and leave the other ranks waiting; recording it keeps every rank in step so they can
    agree on the outcome afterwards. Once a write failed, later ones are skipped (the
    checkpoint is lost anyway and the disk may be full).
    """

    def __init__(self, inner, step: int):
        self.inner, self.step = inner, step
        self.error: str | None = None

    def run(self, path, write: Callable[[], object]) -> None:
        if self.error is None:
            self.error = _attempt(lambda: (faults.check_write(path, self.step), write()))

    def makedirs(self, path, exist_ok=False):
        self.run(path, lambda: self.inner.makedirs(path, exist_ok=exist_ok))

    def save(self, state_dict, path):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        def write():
            if isinstance(self.inner, TorchCheckpointEngine):
                # Through a Python file object a failed write raises OSError (ENOSPC, EIO);
                # torch.save to a path reports only an opaque RuntimeError.
                with open(path, "wb") as f:
                    self.inner.save(state_dict, f)
            else:
                self.inner.save(state_dict, path)

        self.run(path, write)
        faults.maybe_kill_in_save(self.step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.contextmanager
def _guarded_writes(engine, step: int) -> Iterator[_GuardedWrites]:
    guard = _GuardedWrites(engine.checkpoint_engine, step)
    engine.checkpoint_engine = guard
    # Rank 0 also copies DeepSpeed's zero_to_fp32 scripts next to the checkpoints with a
    # plain copyfile, outside the checkpoint engine: guard that write the same way.
    copy_scripts = getattr(type(engine), "_copy_recovery_script", None)
    if copy_scripts is not None:
        engine._copy_recovery_script = lambda save_path: guard.run(
            save_path, lambda: copy_scripts(engine, save_path)
        )
    try:
        yield guard
    finally:
        engine.checkpoint_engine = guard.inner
        engine.__dict__.pop("_copy_recovery_script", None)


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


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer at the bottom of DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    while getattr(opt, "optimizer", None) not in (None, opt):
        opt = opt.optimizer
    return opt


def _group_hyperparams(engine) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in group.items() if k != "params"}
        for group in base_optimizer(engine).param_groups
    ]


def _load_universal_without_zero(engine, step_dir: Path) -> dict:
    """DeepSpeed loads a universal checkpoint into its ZeRO optimizers only: megapatch's
    own loader (zero0.py) for the rest; DeepSpeed's step counters from the model states."""
    from megapatch.checkpoint.zero0 import load_universal

    load_universal(engine, step_dir)
    states = safe_load(step_dir / "mp_rank_00_model_states.pt", mmap=True)
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in states:
            setattr(engine, key, states[key])
    return {k: v for k, v in states.items() if k not in ("module", "optimizer")}


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
            c
            for c in self.dir.iterdir()
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
            log.warning(
                "%s names %r, which is not a complete checkpoint; using the newest complete one",
                latest_file,
                tag,
            )
        return complete[-1] if complete else None

    def remove_incomplete(self) -> None:
        """Delete checkpoints a killed save left behind (rank 0, at start-up only)."""
        if _is_rank0():
            for path in self.incomplete_checkpoints():
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
                shutil.rmtree(path, ignore_errors=True)
        _barrier()

    # -- saving ----------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail before training when the directory cannot take a checkpoint (read-only, no
        permission), rather than at the first save hours later."""
        error = None
        if _is_rank0():

            def probe():
                faults.check_write(self.dir, None)
                self.dir.mkdir(parents=True, exist_ok=True)
                probe_file = self.dir / f".write_test.{os.getpid()}"
                with open(probe_file, "w") as f:
                    f.write("ok\n")
                    f.flush()
                    os.fsync(f.fileno())
                probe_file.unlink()

            error = _attempt(probe)
        error = _from_rank0(error)
        if error:
            raise CheckpointError(
                f"checkpoint directory {self.dir} is not writable ({error}); make it writable or "
                "set checkpoint.dir to a writable directory (nothing was trained)"
            )

    def save(
        self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]
    ) -> Path:
        """Save a complete checkpoint for `step`; returns its directory.

        Raises CheckpointWriteError on every rank if any rank could not write its part.
        """
        tag = tag_for_step(step)
        path = self.dir / tag
        # Every rank must agree on whether to save: rank 0 decides from the filesystem.
        if _from_rank0((path / COMPLETE).is_file()):
            log.info("checkpoint %s already complete; not written again", path)
            return path
        error = None
        if _is_rank0():

            def prepare():
                faults.check_write(path, step)
                if path.exists():  # an interrupted earlier attempt at this step
                    shutil.rmtree(path)
                self.dir.mkdir(parents=True, exist_ok=True)

            error = _attempt(prepare)
        _barrier()
        with _guarded_writes(engine, step) as guard:
            engine.save_checkpoint(
                str(self.dir), tag=tag, client_state=client_state, save_latest=False
            )
        error = error or guard.error
        if error is None:
            error = _attempt(lambda: self._write_rank_state(path, step, rank_state))
        faults.maybe_kill_in_save(step)
        self._raise_if_failed(path, _first_error(error))

        # Every rank's part is on disk: mark it complete, then make it the latest.
        error = None
        if _is_rank0():
            error = _attempt(lambda: self._mark_complete(path, step))
        self._raise_if_failed(path, _from_rank0(error))
        if _is_rank0():
            self._prune(keep=tag)
        _barrier()
        log.info("saved checkpoint %s", path)
        return path

    def _write_rank_state(self, path: Path, step: int, rank_state: dict[str, Any]) -> None:
        rank_dir = path / "megapatch"
        rank_dir.mkdir(parents=True, exist_ok=True)
        rank = _rank()
        tmp = rank_dir / f".rank_{rank:05d}.pt.tmp"
        faults.check_write(tmp, step)
        with open(tmp, "wb") as f:  # a file object: a full disk raises OSError (see _GuardedWrites)
            torch.save({"rng": rng_state(), **rank_state}, f)
        os.replace(tmp, rank_dir / f"rank_{rank:05d}.pt")

    def _mark_complete(self, path: Path, step: int) -> None:
        faults.check_write(path / COMPLETE, step)
        _atomic_write_text(path / COMPLETE, f"{step}\n")
        try:
            _atomic_write_text(self.dir / LATEST, path.name + "\n")
        except OSError:
            # `latest` would still name an older checkpoint than this complete one:
            # withdraw COMPLETE so the two never disagree.
            (path / COMPLETE).unlink(missing_ok=True)
            raise

    def _raise_if_failed(self, path: Path, error: str | None) -> None:
        """Called by every rank with the same `error`: on failure drop the partial checkpoint."""
        if error is None:
            return
        if _is_rank0():
            shutil.rmtree(path, ignore_errors=True)  # give back what the partial save took
        _barrier()
        raise CheckpointWriteError(
            f"could not write checkpoint {path} ({error}); earlier checkpoints are untouched "
            f"(latest: {self._latest_tag_text()})"
        )

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
                # its resharded form (reshard.py), if a resume made one, goes with it
                shutil.rmtree(c.path.with_name(c.tag + ".universal"), ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------
    def load(self, engine, checkpoint: CheckpointInfo, load_optimizer: bool = True) -> dict:
        """Load weights and optimizer state into `engine` and restore this rank's RNG;
        returns this rank's own state. The client state is not parsed here: a resume reads
        it once, beforehand (`resume.resume_point`)."""
        # DeepSpeed's ZeRO-3 loader of a universal checkpoint (reshard.py) gives every
        # optimizer group the first group's hyperparameters (weight decay on norm gains):
        # keep the run's own, which are the saved run's (same config identity).
        groups = _group_hyperparams(engine) if is_universal(checkpoint.path) else None
        try:
            if groups is not None and engine.zero_optimization_stage() == 0:
                client_state = _load_universal_without_zero(engine, checkpoint.path)
            else:
                if groups is not None and engine.zero_optimization_stage() == 3:
                    slice_for_zero3_tensor_parallelism(engine)
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
        if groups is not None:
            base = base_optimizer(engine)
            for group, saved in zip(base.param_groups, groups, strict=True):
                group.update(saved)
            # DeepSpeed's ZeRO-3 loader hands every sub-group the *same* step tensor, which
            # torch's Adam increments in place: with n sub-groups the step count (and its
            # bias correction) would run n times too fast. Each gets its own.
            for state in base.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        rank = dist.get_rank() if dist.is_initialized() else 0
        rank_file = checkpoint.path / "megapatch" / f"rank_{rank:05d}.pt"
        rank_state: dict[str, Any] = {}
        if rank_file.is_file():
            rank_state = safe_load(rank_file)
            set_rng_state(rank_state["rng"])
        else:
            log.warning(
                "%s missing (different world size?); RNG not restored on rank %d", rank_file, rank
            )
        return rank_state
