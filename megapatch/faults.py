"""Fault injection for tests of resume and hardening, driven by environment variables.

    MEGAPATCH_FAULT_NAN_STEPS=3,4       the loss of these global steps (0-based) becomes NaN
    MEGAPATCH_FAULT_KILL_AFTER_STEP=7   SIGKILL this process once step 7 has finished (and
                                        any checkpoint due at step 7 is saved)
    MEGAPATCH_FAULT_KILL_IN_SAVE=8      SIGKILL mid-write of the checkpoint of step 8: right
                                        after this rank wrote its first file of it
    MEGAPATCH_FAULT_HANG_AFTER_STEP=4   stop responding once step 4 has finished: the process
                                        sleeps and never joins another collective (SIGTERM or
                                        SIGKILL still end it, as a launcher tearing down does)
    MEGAPATCH_FAULT_SAVE_ERROR=ENOSPC   every checkpoint write fails with this errno (ENOSPC,
                                        EROFS, EACCES, EIO, ...); ENOSPC@6,9 only the writes of
                                        the checkpoints of steps 6 and 9 (and of a reshard
                                        of the checkpoint of that step, before it completes)
    MEGAPATCH_FAULT_KILL_IN_RESHARD=6   SIGKILL a reshard of the checkpoint of step 6 once it
                                        wrote its data, before it is complete
    MEGAPATCH_FAULT_RANKS=1             restrict kills, hangs and write errors to these global
                                        ranks (default: all)
    MEGAPATCH_RECORD_DATA_CRC=1         log a checksum of each step's global batch (the sum of
                                        its windows' CRC-32, the same at any DP size), so tests
                                        can prove a resumed run read the same windows

Unset, every hook is a no-op costing one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def _steps(value: str) -> set[int]:
    return {int(s) for s in value.split(",") if s.strip()}


def _env_steps(name: str) -> set[int]:
    return _steps(os.environ.get(name, ""))


def _this_rank_selected() -> bool:
    ranks = os.environ.get("MEGAPATCH_FAULT_RANKS")
    if not ranks:
        return True
    return int(os.environ.get("RANK", "0")) in _steps(ranks)


def nan_at(step: int) -> bool:
    return step in _env_steps("MEGAPATCH_FAULT_NAN_STEPS")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_after_step(step: int) -> None:
    if step in _env_steps("MEGAPATCH_FAULT_KILL_AFTER_STEP") and _this_rank_selected():
        _kill()


def maybe_hang_after_step(step: int) -> None:
    if step in _env_steps("MEGAPATCH_FAULT_HANG_AFTER_STEP") and _this_rank_selected():
        # A stuck rank: no more collectives. Default signal handling, so a launcher's
        # SIGTERM ends it rather than asking for a preemption checkpoint it cannot make.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        while True:
            time.sleep(3600)


def maybe_kill_in_save(step: int) -> None:
    """Called after each file this rank writes into the checkpoint of `step`."""
    if step in _env_steps("MEGAPATCH_FAULT_KILL_IN_SAVE") and _this_rank_selected():
        _kill()


def maybe_kill_in_reshard(step: int) -> None:
    """Called once a reshard of checkpoint `step` wrote its data, before it is complete."""
    if step in _env_steps("MEGAPATCH_FAULT_KILL_IN_RESHARD") and _this_rank_selected():
        _kill()


def check_write(path: str | os.PathLike, step: int | None) -> None:
    """Raise the injected OSError for a checkpoint write of `step` (None: a write that
    belongs to no step, such as the start-up probe of the directory; it fails only when
    every write is set to fail)."""
    spec = os.environ.get("MEGAPATCH_FAULT_SAVE_ERROR")
    if not spec or not _this_rank_selected():
        return
    name, _, steps = spec.partition("@")
    selected = _steps(steps)
    if selected and step not in selected:
        return
    code = getattr(errno, name.strip())
    raise OSError(code, os.strerror(code), str(path))


def record_data_crc() -> bool:
    return os.environ.get("MEGAPATCH_RECORD_DATA_CRC") == "1"
