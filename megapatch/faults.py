"""Fault injection for tests of resume and hardening, driven by environment variables.

    MEGAPATCH_FAULT_NAN_STEPS=3,4       the loss of these global steps (0-based) becomes NaN
    MEGAPATCH_FAULT_KILL_AFTER_STEP=7   SIGKILL this process once step 7 has finished (and
                                        any checkpoint due at step 7 is saved)
    MEGAPATCH_FAULT_KILL_IN_SAVE=8      SIGKILL while the checkpoint of step 8 is being
                                        written (before it is marked complete)
    MEGAPATCH_FAULT_RANKS=1             restrict kills to these global ranks (default: all)
    MEGAPATCH_RECORD_DATA_CRC=1         log a CRC of each step's batches (rank 0's slice), so
                                        tests can prove a resumed run read the same windows

Unset, every hook is a no-op costing one dict lookup.
"""

from __future__ import annotations

import os
import signal


def _steps(name: str) -> set[int]:
    value = os.environ.get(name, "")
    return {int(s) for s in value.split(",") if s.strip()}


def _this_rank_selected() -> bool:
    ranks = os.environ.get("MEGAPATCH_FAULT_RANKS")
    if not ranks:
        return True
    return int(os.environ.get("RANK", "0")) in {int(r) for r in ranks.split(",") if r.strip()}


def nan_at(step: int) -> bool:
    return step in _steps("MEGAPATCH_FAULT_NAN_STEPS")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_after_step(step: int) -> None:
    if step in _steps("MEGAPATCH_FAULT_KILL_AFTER_STEP") and _this_rank_selected():
        _kill()


def maybe_kill_in_save(step: int) -> None:
    if step in _steps("MEGAPATCH_FAULT_KILL_IN_SAVE") and _this_rank_selected():
        _kill()


def record_data_crc() -> bool:
    return os.environ.get("MEGAPATCH_RECORD_DATA_CRC") == "1"
