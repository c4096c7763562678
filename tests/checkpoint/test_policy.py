"""When a run saves, and what a failed save means (checkpoint.max_failed_saves)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from megapatch.checkpoint.manager import CheckpointInfo, CheckpointWriteError
from megapatch.checkpoint.policy import SavePolicy
from megapatch.logging_utils import LOGGER_NAME


@dataclass(frozen=True)
class Section:  # the fields of the config's checkpoint section the policy reads
    interval: int = 4
    at_switch: bool = True
    max_failed_saves: int | None = 1


def policy(**kw) -> SavePolicy:
    return SavePolicy(Section(**kw), last_step=12, checkpoint_dir=Path("ckpts"))


def test_saves_at_the_interval_and_the_switch_but_never_inside_a_nonfinite_streak():
    p = policy()
    due = {
        step: p.due(
            step,
            phase_name="patch" if step <= 6 else "token",
            at_phase_end=step == 6,
            nonfinite_streak=0,
        )
        for step in range(1, 13)
    }
    assert {s: r for s, r in due.items() if r} == {
        4: "interval",
        6: "switch",
        8: "interval",
        12: "interval",
    }
    assert p.due(8, phase_name="token", at_phase_end=False, nonfinite_streak=1) is None
    assert (
        policy(at_switch=False).due(6, phase_name="patch", at_phase_end=True, nonfinite_streak=0)
        is None
    )
    assert (
        policy(interval=0).due(8, phase_name="token", at_phase_end=False, nonfinite_streak=0)
        is None
    )
    # the end of the token phase is not a switch (the final save covers it)
    assert (
        policy(interval=0).due(12, phase_name="token", at_phase_end=True, nonfinite_streak=0)
        is None
    )


def test_a_failed_periodic_save_is_logged_until_too_many_fail_in_a_row(caplog):
    p = policy(max_failed_saves=1)
    error = CheckpointWriteError("could not write checkpoint ckpts/step_00000004 (No space left)")
    latest = CheckpointInfo("step_00000002", 2, Path("ckpts/step_00000002"))
    logging.getLogger(LOGGER_NAME).propagate = True
    with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
        p.failed(error, step=4, reason="interval", final=False, latest=latest)
    assert "training goes on" in caplog.text and "since step_00000002" in caplog.text
    with pytest.raises(
        CheckpointWriteError,
        match=r"2 checkpoint saves failed in a row \(checkpoint.max_failed_saves=1\)",
    ):
        p.failed(error, step=8, reason="interval", final=False, latest=latest)
    assert p.failed_saves == 2

    p.saved()  # a success resets the streak, not the count
    p.failed(error, step=8, reason="interval", final=False, latest=latest)
    assert p.failed_in_a_row == 1 and p.failed_saves == 3


def test_a_failed_final_save_stops_the_run_and_says_what_is_lost():
    p = policy(max_failed_saves=None)
    error = CheckpointWriteError("could not write checkpoint ckpts/step_00000012 (EIO)")
    with pytest.raises(
        CheckpointWriteError,
        match="this was the end checkpoint, so training since the start of the run is lost",
    ):
        p.failed(error, step=12, reason="end", final=True, latest=None)


def test_unlimited_failures_never_stop_a_periodic_save():
    p = policy(max_failed_saves=None)
    error = CheckpointWriteError("x")
    for step in (4, 8):
        p.failed(error, step=step, reason="interval", final=False, latest=None)
    assert p.failed_in_a_row == 2
