"""The two keys that bound how long a run puts up with trouble, tested on real runs:

- train.collective_timeout_s: how long a collective waits for a rank that died or hangs
  (MEGAPATCH_COLLECTIVE_TIMEOUT_S, when set, wins over it);
- checkpoint.max_failed_saves: how many periodic saves may fail in a row before the run
  stops (null: never).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megapatch.checkpoint.full_weights import read_checkpoint
from megapatch.config import load_config
from megapatch.errors import ConfigError
from tests.hardening.conftest import (
    assert_no_megapatch_traceback,
    checkpoint_dirs,
    error_line,
    latest_tag,
    step_dir,
    tree_digest,
)
from tests.training.conftest import (
    REPO,
    TINY_OVERRIDES,
    run_train,
    train_cmd,
    train_env,
    train_records,
)

TINY_CONFIG = REPO / "configs" / "tiny.yaml"

# -- train.collective_timeout_s --------------------------------------------------------------


def _step_logged(metrics: Path, step: int) -> bool:
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line still being written
            if json.loads(line).get("step") == step:
                return True
    return False


def _run_until_a_rank_hangs(corpus, run_dir: Path, *overrides: str, env: dict) -> tuple:
    """DP=2 under torchrun; rank 1 stops responding after step 4. Returns the finished
    process and the seconds from step 4's metrics record (rank 0 then waits in step 5's
    first collective) to the end of the job."""
    args = train_cmd(2) + [
        str(TINY_CONFIG),
        *TINY_OVERRIDES,
        f"data.path={corpus}",
        f"run.dir={run_dir}",
        *overrides,
    ]
    env = train_env(MEGAPATCH_FAULT_HANG_AFTER_STEP="4", MEGAPATCH_FAULT_RANKS="1", **env)
    run_dir.mkdir(parents=True)
    out_path, err_path = run_dir.parent / "stdout.log", run_dir.parent / "stderr.log"
    # Output to files, not pipes: a full pipe would stall the job while it is watched.
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
        )
        hung_at = None
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if hung_at is None and _step_logged(run_dir / "metrics.jsonl", 4):
                hung_at = time.monotonic()
            time.sleep(0.1)
        ended_at = time.monotonic()
        if proc.poll() is None:  # no timeout took effect: end the job (this session is ours)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = err_path.read_text()
    assert hung_at is not None, f"step 4 was never logged\n{stderr[-3000:]}"
    done = subprocess.CompletedProcess(args, proc.returncode, out_path.read_text(), stderr)
    return done, ended_at - hung_at


@pytest.mark.slow
@pytest.mark.distributed
def test_the_config_key_sets_the_collective_timeout(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("MEGAPATCH_COLLECTIVE_TIMEOUT_S", raising=False)
    proc, waited = _run_until_a_rank_hangs(
        tiny_corpus, tmp_path / "run", "train.collective_timeout_s=10", env={}
    )
    assert proc.returncode != 0
    line = error_line(proc)
    assert "rank 0 lost contact with the other ranks (Timed out" in line, line
    assert "collective timeout of 10 s (train.collective_timeout_s)" in line, line
    assert "stopped after step 4" in line
    assert_no_megapatch_traceback(proc.stderr)
    # the job ends about the configured time after the hang (not the 600 s default)
    assert 8 <= waited <= 10 + 30, waited


@pytest.mark.slow
@pytest.mark.distributed
def test_the_environment_variable_overrides_the_config_key(tiny_corpus, tmp_path):
    proc, waited = _run_until_a_rank_hangs(
        tiny_corpus,
        tmp_path / "run",
        "train.collective_timeout_s=900",
        env={"MEGAPATCH_COLLECTIVE_TIMEOUT_S": "10"},
    )
    assert proc.returncode != 0
    line = error_line(proc)
    assert "collective timeout of 10 s (MEGAPATCH_COLLECTIVE_TIMEOUT_S)" in line, line
    assert_no_megapatch_traceback(proc.stderr)
    assert waited <= 10 + 30, waited


# -- bad values: one line naming the key, exit status 2 --------------------------------------

BAD_VALUES = [
    ("train.collective_timeout_s=0", "expected a positive finite number of seconds"),
    ("train.collective_timeout_s=-5", "expected a positive finite number of seconds"),
    ("train.collective_timeout_s=.inf", "expected a positive finite number of seconds"),
    ("train.collective_timeout_s=.nan", "expected a positive finite number of seconds"),
    ("train.collective_timeout_s=ten", "expected a number"),
    ("checkpoint.max_failed_saves=-1", "expected a value >= 0"),
    ("checkpoint.max_failed_saves=1.5", "expected an integer"),
    ("checkpoint.max_failed_saves=many", "expected an integer or null"),
]


@pytest.mark.parametrize("override, expected", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key(override, expected):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, [override])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"override {override!r}: {key}="), message
    assert expected in message, message


@pytest.mark.parametrize(
    "override, env, names",
    [
        ("train.collective_timeout_s=0", {}, "train.collective_timeout_s=0.0: expected"),
        ("checkpoint.max_failed_saves=-2", {}, "checkpoint.max_failed_saves=-2: expected"),
        (
            "train.collective_timeout_s=30",
            {"MEGAPATCH_COLLECTIVE_TIMEOUT_S": "soon"},
            "MEGAPATCH_COLLECTIVE_TIMEOUT_S='soon': expected a positive number of seconds",
        ),
    ],
    ids=["collective_timeout_s", "max_failed_saves", "timeout-variable"],
)
def test_megapatch_train_refuses_a_bad_value_with_exit_status_2(
    tiny_corpus, tmp_path, override, env, names
):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_corpus, run_dir, override, env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert names in error_line(proc)
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()


# -- checkpoint.max_failed_saves -------------------------------------------------------------
# TINY_OVERRIDES save at steps 3, 6, 8 (the switch), 9 and 12 (the end).


@pytest.mark.slow
def test_too_many_failed_saves_in_a_row_stop_the_run(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    # A good checkpoint at step 3 first (the run stops there), its bytes noted.
    run_train(tiny_corpus, run_dir, "train.max_steps=3", "eval.interval=0")
    good = tree_digest(step_dir(run_dir, 3))

    # Resumed with every later save failing (the start-up probe of the directory passes):
    # 6 fails (1 in a row, allowed), 8 fails (2): the run stops.
    proc = run_train(
        tiny_corpus,
        run_dir,
        "checkpoint.max_failed_saves=1",
        "eval.interval=0",
        env={"MEGAPATCH_FAULT_SAVE_ERROR": "ENOSPC@6,8,9,12"},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert "2 checkpoint saves failed in a row (checkpoint.max_failed_saves=1)" in line, line
    assert f"could not write checkpoint {ckpt_dir}/step_00000008 (No space left on device" in line
    assert f"stopped after step 8, the last good checkpoint is {step_dir(run_dir, 3)} " in line
    assert "(training since step_00000003 is lost)" in line
    assert f"free space in (or fix) {ckpt_dir}, then rerun with train.resume=auto" in line
    assert_no_megapatch_traceback(proc.stderr)
    failed = [line for line in proc.stderr.splitlines() if "ERROR could not write" in line]
    assert len(failed) == 1 and "step_00000006" in failed[0], failed
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, 9))

    # nothing partial left, nothing existing touched
    assert checkpoint_dirs(run_dir) == {"step_00000003": True}
    assert latest_tag(run_dir) == "step_00000003"
    assert tree_digest(step_dir(run_dir, 3)) == good
    assert read_checkpoint(run_dir).step == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_the_ranks_agree_to_stop_when_only_one_cannot_write(tiny_corpus, tmp_path):
    # DP=2, max_failed_saves=0: rank 1 alone fails to write checkpoint 3; rank 0 wrote its
    # part, yet both stop there together (neither waits for the other in step 4).
    run_dir = tmp_path / "run"
    proc = run_train(
        tiny_corpus,
        run_dir,
        "checkpoint.max_failed_saves=0",
        "eval.interval=0",
        nproc=2,
        env={"MEGAPATCH_FAULT_SAVE_ERROR": "EIO@3", "MEGAPATCH_FAULT_RANKS": "1"},
        check=False,
        timeout=240,
    )
    assert proc.returncode != 0
    lines = {
        line for line in proc.stderr.splitlines() if line.startswith("megapatch train: error:")
    }
    assert len(lines) == 1, proc.stderr[-3000:]  # each rank printed the same line
    line = lines.pop()
    assert "1 checkpoint save failed in a row (checkpoint.max_failed_saves=0)" in line, line
    assert "(rank 1: Input/output error" in line, line
    assert "the last good checkpoint is none (training since the start of the run is lost)" in line
    assert_no_megapatch_traceback(proc.stderr)
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3]
    assert checkpoint_dirs(run_dir) == {} and latest_tag(run_dir) is None


@pytest.mark.slow
def test_a_good_save_resets_the_count_and_null_never_stops(tiny_corpus, tmp_path):
    # max_failed_saves=1: 6 fails (1 in a row), 8 is written (0), 9 fails (1): goes on to 12.
    run_dir = tmp_path / "reset"
    run_train(
        tiny_corpus,
        run_dir,
        "checkpoint.max_failed_saves=1",
        "eval.interval=0",
        env={"MEGAPATCH_FAULT_SAVE_ERROR": "ENOSPC@6,9"},
    )
    assert json.loads((run_dir / "summary.json").read_text())["failed_saves"] == 2
    assert checkpoint_dirs(run_dir) == {f"step_{s:08d}": True for s in (3, 8, 12)}

    # null: four failures in a row (more than the default 3) and training goes on, as before
    run_dir = tmp_path / "null"
    proc = run_train(
        tiny_corpus,
        run_dir,
        "checkpoint.max_failed_saves=null",
        "checkpoint.interval=2",
        "eval.interval=0",
        env={"MEGAPATCH_FAULT_SAVE_ERROR": "ENOSPC@4,6,8,10"},
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failed_saves"] == 4
    assert checkpoint_dirs(run_dir) == {"step_00000002": True, "step_00000012": True}
    assert proc.stderr.count("ERROR could not write checkpoint") == 4
