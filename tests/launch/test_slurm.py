"""launch/slurm/train.sbatch on a real (one-node, localhost) SLURM cluster: a full run,
a run preempted by the time-limit signal that requeues itself and resumes, and the
submissions that must fail with one line before anything starts.

The node offers 2 stand-in GPUs (gres device files; nothing opens them), so the script's
GPU accounting is exercised, while the ranks themselves train on the CPU.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.launch.conftest import (
    LAUNCH,
    REPO,
    TINY_CONFIG,
    TINY_OVERRIDES,
    script_env,
    train_losses,
)
from tests.launch.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SBATCH = str(LAUNCH / "slurm" / "train.sbatch")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), gpus=2)
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM test cluster here: {exc}")
    yield cluster
    cluster.stop()


def _submit(
    slurm: SlurmCluster, tmp_path: Path, *args: str, env: dict | None = None
) -> tuple[int, Path]:
    log = tmp_path / "job.out"
    job = slurm.sbatch(
        [f"--output={log}", "--gpus-per-node=2", "--time=10", "--job-name=test", *args],
        cwd=REPO,
        env={**script_env(), **(env or {}), "SLURM_CONF": slurm.env["SLURM_CONF"]},
    )
    return job, log


def _run_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        SBATCH,
        TINY_CONFIG,
        *TINY_OVERRIDES,
        f"data.path={corpus}",
        f"run.dir={run_dir}",
        *extra,
    ]


def _read(log: Path) -> str:
    return log.read_text() if log.exists() else "(no job output)"


def _error_lines(log: Path) -> list[str]:
    return [line for line in _read(log).splitlines() if line.strip()]


def test_sbatch_trains_both_phases_and_checkpoints(slurm, tiny_corpus, tmp_path):
    # Through the container hook, with a stand-in for `apptainer exec --nv IMAGE`.
    container = tmp_path / "container"
    container.write_text('#!/bin/bash\necho "in the container: $1 ${2##*/}" >&2\nexec "$@"\n')
    container.chmod(0o755)
    run_dir = tmp_path / "run"
    job, log = _submit(
        slurm, tmp_path, *_run_args(tiny_corpus, run_dir), env={"CONTAINER": str(container)}
    )
    state = slurm.wait(job, timeout=400)
    assert state == "COMPLETED", f"job {job} {state}:\n{_read(log)[-4000:]}"

    out = _read(log)
    assert "1 node(s) x 2 rank(s)" in out  # one task per node, 2 ranks from the 2 GPUs
    assert "in the container: python3 preflight.py" in out  # the config check
    assert "in the container: env PYTHON=python3" in out  # the node's launcher
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    phases = [phase for _, phase, _ in train_losses(run_dir)]
    assert phases == ["patch"] * 4 + ["token"] * 2
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000002", "step_00000004", "step_00000006"]
    assert all((run_dir / "checkpoints" / c / "COMPLETE").exists() for c in checkpoints)
    assert slurm.job(job)["Restarts"] == "0"


def _wait_for_step(run_dir: Path, step: int, slurm: SlurmCluster, job: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        # Only whole lines: the file is being written.
        lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines):
            return
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), (
            f"job {job} {state} before step {step}:\n{_read(log)}"
        )
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not reach step {step}:\n{_read(log)[-4000:]}")


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    # 192 steps (128 patch, 64 token; a few seconds), so the signal lands mid-run.
    steps = 192
    job, log = _submit(
        slurm,
        tmp_path,
        *_run_args(
            tiny_corpus, run_dir, f"train.total_tokens={512 * steps}", "checkpoint.interval=1000"
        ),
    )
    _wait_for_step(run_dir, 1, slurm, job, log)
    # What SLURM does at --signal=B:USR1@300: signal the batch shell only.
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])

    # A requeued job waits out a start delay (BeginTime); play the impatient admin.
    deadline = time.monotonic() + 300
    while True:
        info = slurm.job(job)
        if info["Restarts"] != "0" and info["JobState"] != "PENDING":
            break
        assert info["Restarts"] != "0" or info["JobState"] in ("RUNNING", "COMPLETING"), (
            f"job {job} {info['JobState']} without a requeue:\n{_read(log)}"
        )
        # Not before the node has let go of the first run (idle), and a second later:
        # slurmd refuses a restart whose credential dates from the second it revoked the
        # first run's ("Job credential revoked": the job FAILS).
        if (
            info["JobState"] == "PENDING"
            and info.get("Reason") == "BeginTime"
            and slurm.node_state() == "idle"
        ):
            time.sleep(1.5)
            slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        assert time.monotonic() < deadline, f"job {job} not requeued:\n{_read(log)}"
        time.sleep(0.5)
    state = slurm.wait(job, timeout=400)
    out = _read(log)
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-4000:]}"
    assert slurm.job(job)["Restarts"] == "1"

    # The first run stopped with a checkpoint, the requeued one resumed from it.
    assert "received SIGUSR1" in out and "requeueing job" in out
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    preempted_at = int(saved[0].name.removeprefix("step_"))
    assert 1 <= preempted_at < 128 and (saved[0] / "COMPLETE").exists()
    assert f"at step {preempted_at}" in out.split("resumed from", 1)[-1].splitlines()[0]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    losses = train_losses(run_dir)
    # Every step logged once: the requeued run went on from the checkpoint, no step redone.
    assert [step for step, _, _ in losses] == list(range(1, steps + 1))
    assert [phase for _, phase, _ in losses] == ["patch"] * 128 + ["token"] * 64


def test_sbatch_without_config_fails_before_starting(slurm, tmp_path):
    job, log = _submit(slurm, tmp_path, SBATCH)
    assert slurm.wait(job, timeout=120) == "FAILED"
    assert slurm.job(job)["ExitCode"] == "2:0"
    lines = _error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("train.sbatch: error: no config"), lines


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["parallel.gpus_per_node=4"],
            "asks for 4 GPUs per node but each node of the allocation has only 2",
        ),
        (["parallel.nodes=2", "parallel.gpus_per_node=2"], "parallel.nodes=2"),
    ],
    ids=["more-gpus", "more-nodes"],
)
def test_config_larger_than_allocation_fails_before_starting(
    slurm, tiny_corpus, tmp_path, overrides, expected
):
    run_dir = tmp_path / "run"
    job, log = _submit(slurm, tmp_path, *_run_args(tiny_corpus, run_dir, *overrides))
    assert slurm.wait(job, timeout=120) == "FAILED"
    lines = _error_lines(log)
    assert (
        len(lines) == 1 and lines[0].startswith("train.sbatch: error: ") and expected in lines[0]
    ), lines
    assert not run_dir.exists()


def test_direct_srun_of_the_engine_maps_slurm_ranks(slurm, tiny_corpus, tmp_path):
    """`srun --ntasks=2 megapatch train`: no torchrun; the engine reads SLURM_PROCID/NTASKS."""
    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **slurm.env,
        **script_env(),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    proc = slurm.run(
        [
            "srun",
            "--ntasks=2",
            "--time=10",
            sys.executable,
            "-m",
            "megapatch",
            "train",
            TINY_CONFIG,
            *TINY_OVERRIDES,
            f"data.path={tiny_corpus}",
            f"run.dir={run_dir}",
        ],
        check=False,
        env=env,
        cwd=REPO,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TP=1 x DP=2 over 2 ranks" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
