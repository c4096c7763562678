"""The launch scripts with real training runs, without a scheduler: two "nodes" on this
machine, started the way a cluster without ssh starts them (each node runs the launcher
with its own node rank), must produce the losses of a one-node DP=2 run; and a signal to
the script must become a checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.launch.conftest import (
    LAUNCH,
    REPO,
    TINY_CONFIG,
    TINY_OVERRIDES,
    script_env,
    train_losses,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    try:
        return subprocess.Popen(
            ["bash", *argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=script_env()
        )
    finally:
        out.close()


def _finish(procs: dict[str, subprocess.Popen], logs: Path, timeout: float = 400) -> None:
    failed = []
    for name, proc in procs.items():
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0:
            tail = (logs / f"{name}.log").read_text()[-3000:]
            failed.append(f"--- {name} exited {proc.returncode} ---\n{tail}")
    assert not failed, "\n".join(failed)


def test_two_nodes_without_ssh_match_one_node(tiny_corpus, tmp_path):
    def config(run_dir: Path) -> list[str]:
        return [TINY_CONFIG, *TINY_OVERRIDES, f"data.path={tiny_corpus}", f"run.dir={run_dir}"]

    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    port = free_port()
    procs = {
        "one-node": _start(
            [str(LAUNCH / "torchrun.sh"), "--nproc_per_node", "2", *config(one_node)],
            tmp_path / "one-node.log",
        )
    }
    for rank in (0, 1):
        procs[f"node{rank}"] = _start(
            [
                str(LAUNCH / "deepspeed.sh"),
                "--no_ssh",
                "--num_nodes",
                "2",
                "--node_rank",
                str(rank),
                "--num_gpus",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *config(two_nodes),
            ],
            tmp_path / f"node{rank}.log",
        )
    _finish(procs, tmp_path)

    reference = train_losses(one_node)
    assert [phase for _, phase, _ in reference] == ["patch"] * 4 + ["token"] * 2
    got = train_losses(two_nodes)
    assert [(s, p) for s, p, _ in got] == [(s, p) for s, p, _ in reference]
    for (step, _, a), (_, _, b) in zip(got, reference):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), f"step {step}: {a} != {b}"
    # Both launchers really started a world of two: one rank on each "node".
    for rank in (0, 1):
        log = (tmp_path / f"node{rank}.log").read_text()
        assert "2 node(s) x 1 rank(s) (world 2" in log
        assert f"node_rank={rank}" in log
    assert "node 0 of 1, 2 rank(s) per node (world 2" in (tmp_path / "one-node.log").read_text()


def test_sigterm_to_the_launch_script_checkpoints_and_stops(tiny_corpus, tmp_path):
    """Only the script is signalled (as `kill PID` or a scheduler would): it must reach
    the ranks below torchrun, which checkpoint and exit 0 with status "preempted"."""
    run_dir = tmp_path / "run"
    args = [
        TINY_CONFIG,
        *TINY_OVERRIDES,
        f"data.path={tiny_corpus}",
        f"run.dir={run_dir}",
        "train.total_tokens=98304",
        "checkpoint.interval=1000",
    ]  # 192 steps
    log = tmp_path / "torchrun.log"
    proc = _start([str(LAUNCH / "torchrun.sh"), "--nproc_per_node", "2", *args], log)
    try:
        deadline = time.monotonic() + 300
        while not _logged_a_step(run_dir):
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "torchrun.sh: received SIGTERM" in log.read_text()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
    (checkpoint,) = (run_dir / "checkpoints").glob("step_*")
    assert (checkpoint / "COMPLETE").exists()
    assert int(checkpoint.name.removeprefix("step_")) < 192


def _logged_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count("\n") >= 1
