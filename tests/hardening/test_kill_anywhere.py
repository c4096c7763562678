"""Kill anywhere: one 2-process run (torchrun, DP=2) struck again and again, resumed each
time with train.resume=auto, must end exactly where an uninterrupted run ends.

The strikes, in order (the step of the first comes from a seeded generator; set
MEGAPATCH_HARDENING_SEED to explore others):

1. SIGKILL of every rank after a random patch step
2. SIGKILL mid-write of checkpoint 6 (after the first file of it)
3. one rank (chosen by the seed) SIGKILLed after step 8, the last patch step: the other
   must stop with one clear line, and torchrun end the job
4. SIGKILL of every rank after step 10, just after the switch
5. a full disk on rank 1 while checkpoint 10 is written; the run goes on to the end
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.hardening.conftest import (
    assert_no_megapatch_traceback,
    checkpoint_dirs,
    error_line,
    latest_tag,
    model_states,
)
from tests.training.conftest import run_train, train_records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEED = int(os.environ.get("MEGAPATCH_HARDENING_SEED", "2407"))


@dataclass
class Strike:
    name: str
    env: dict
    overrides: tuple = ()
    # filled in by the run
    returncode: int | None = None
    stderr: str = ""
    steps: tuple = ()
    checkpoints: dict | None = None
    latest: str | None = None


def _strikes() -> list[Strike]:
    rng = random.Random(SEED)
    random_step = rng.choice([1, 2, 4, 5])
    dying_rank = rng.choice([0, 1])
    return [
        Strike(
            f"SIGKILL after step {random_step}",
            {"MEGAPATCH_FAULT_KILL_AFTER_STEP": str(random_step)},
        ),
        Strike("SIGKILL mid-write of checkpoint 6", {"MEGAPATCH_FAULT_KILL_IN_SAVE": "6"}),
        Strike(
            f"rank {dying_rank} SIGKILLed after step 8",
            {"MEGAPATCH_FAULT_KILL_AFTER_STEP": "8", "MEGAPATCH_FAULT_RANKS": str(dying_rank)},
        ),
        Strike("SIGKILL after step 10", {"MEGAPATCH_FAULT_KILL_AFTER_STEP": "10"}),
        Strike(
            "disk full on rank 1 at checkpoint 10",
            {"MEGAPATCH_FAULT_SAVE_ERROR": "ENOSPC@10", "MEGAPATCH_FAULT_RANKS": "1"},
            ("checkpoint.interval=2",),  # saves at 10 (fails) and 12
        ),
    ]


@pytest.fixture(scope="module")
def struck_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("struck") / "run"
    strikes = _strikes()
    for strike in strikes:
        proc = run_train(
            tiny_corpus, run_dir, *strike.overrides, nproc=2, env=strike.env, check=False
        )
        strike.returncode, strike.stderr = proc.returncode, proc.stderr
        strike.steps = tuple(r["step"] for r in train_records(run_dir))
        strike.checkpoints, strike.latest = checkpoint_dirs(run_dir), latest_tag(run_dir)
    return run_dir, strikes


def _context(strike: Strike) -> str:
    return f"seed {SEED}, strike {strike.name!r}\n--- stderr tail ---\n{strike.stderr[-3000:]}"


def test_every_strike_stopped_the_run_where_it_was_aimed(struck_run):
    _, (random_kill, save_kill, rank_kill, after_switch, disk_full) = struck_run
    first_step = int(random_kill.name.split()[-1])
    for strike, last_step in [
        (random_kill, first_step),
        (save_kill, 6),
        (rank_kill, 8),
        (after_switch, 10),
    ]:
        assert strike.returncode != 0, _context(strike)
        assert strike.steps[-1] == last_step, _context(strike)
    assert disk_full.returncode == 0, _context(disk_full)
    assert disk_full.steps == tuple(range(1, 13))


def test_an_interrupted_save_is_never_latest_and_is_removed(struck_run):
    run_dir, (_, save_kill, rank_kill, *_) = struck_run
    assert save_kill.checkpoints["step_00000006"] is False, _context(save_kill)  # partly written
    assert save_kill.latest == "step_00000003"
    # the next start removes it before resuming from step 3, then writes step 6 anew
    assert (
        "removing incomplete checkpoint" in rank_kill.stderr and "step_00000006" in rank_kill.stderr
    )
    assert rank_kill.checkpoints["step_00000006"] is True
    assert all(checkpoint_dirs(run_dir).values()), checkpoint_dirs(run_dir)


def test_a_dead_rank_stops_the_other_with_one_clear_line(struck_run):
    _, (_, _, rank_kill, *_) = struck_run
    dying = int(rank_kill.name.split()[1])
    line = error_line(rank_kill)
    assert f"rank {1 - dying} lost contact with the other ranks" in line, line
    assert (
        "stopped after step 8" in line and "step_00000008" in line and "train.resume=auto" in line
    )
    assert_no_megapatch_traceback(rank_kill.stderr)
    # the checkpoint of the switch was complete before the rank died, and is the latest
    assert rank_kill.checkpoints["step_00000008"] is True and rank_kill.latest == "step_00000008"


def test_a_full_disk_on_one_rank_skips_that_checkpoint_and_training_goes_on(struck_run):
    run_dir, (*_, disk_full) = struck_run
    errors = [
        line for line in disk_full.stderr.splitlines() if "ERROR could not write checkpoint" in line
    ]
    assert len(errors) == 1, _context(disk_full)
    assert "step_00000010 (rank 1: No space left on device" in errors[0]
    assert "training goes on" in errors[0]
    assert "step_00000010" not in disk_full.checkpoints  # the partial save was removed
    assert disk_full.checkpoints["step_00000012"] is True and disk_full.latest == "step_00000012"
    assert json.loads((run_dir / "summary.json").read_text())["failed_saves"] == 1


def test_the_struck_run_ends_exactly_where_an_uninterrupted_run_ends(struck_run, reference_dp2):
    run_dir, _ = struck_run
    resumed, reference = train_records(run_dir), train_records(reference_dp2)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=0, atol=1e-6
    )
    # the same windows, in the same order, step by step
    assert [r["data_crc"] for r in resumed] == [r["data_crc"] for r in reference]
    final, expected = model_states(run_dir, 12), model_states(reference_dp2, 12)
    progress, expected_progress = final["megapatch"]["progress"], expected["megapatch"]["progress"]
    assert progress["consumed_windows"] == expected_progress["consumed_windows"]
    assert progress["tokens"] == expected_progress["tokens"]
    assert final["module"].keys() == expected["module"].keys()
    for name, weight in expected["module"].items():
        torch.testing.assert_close(final["module"][name], weight, rtol=0, atol=1e-6, msg=name)
