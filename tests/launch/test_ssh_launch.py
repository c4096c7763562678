"""launch/deepspeed.sh across two "nodes" over ssh, as a cluster without a scheduler runs
it: a hostfile of 127.0.0.2 and 127.0.0.3 (2 slots each), a real sshd listening on both
(tests/launch/ssh_nodes.py), key-only login, and the DeepSpeed launcher's default pdsh
runner starting each node's ranks through ssh, a TP2 x PP2 run of the tiny model. A
SIGTERM to the script must stop the ranks on both nodes, which checkpoint (each rank its
own files) and exit 0."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.launch.conftest import LAUNCH, REPO, TINY_CONFIG, TINY_OVERRIDES, script_env
from tests.launch.ssh_nodes import SshNodes, SshUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.xdist_group("ssh-nodes")]

# The 4 ranks as TP2 x PP2: two blocks, one per stage, each stage on one node (PP = 1:
# TP2 x DP2).
TP, PP = 2, 2
LAYOUT = [
    f"parallel.tensor_model_parallel_size={TP}",
    *([f"parallel.pipeline_model_parallel_size={PP}", f"model.n_layers={PP}"] if PP > 1 else []),
]
SLOTS = 2  # ranks per node
STEPS = 192  # train.total_tokens=98304: long enough that the signal lands mid-run


def _ssh_dir_state() -> list[tuple[str, int]] | None:
    """~/.ssh (of the passwd entry, as ssh reads it): its files and their mtimes."""
    home = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    if not home.exists():
        return None
    return sorted((str(p), p.stat().st_mtime_ns) for p in [home, *home.rglob("*")])


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    before = _ssh_dir_state()
    try:
        nodes = SshNodes.start(tmp_path_factory.mktemp("ssh-nodes"))
    except SshUnavailable as exc:
        pytest.skip(f"no ssh test nodes here: {exc}")
    yield nodes
    nodes.stop()
    assert _ssh_dir_state() == before, "the test changed ~/.ssh"


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # gone, or not ours
        return ""


def _processes_of(run_dir: Path) -> dict[int, dict]:
    """This run's launchers and ranks on this machine (both "nodes"): pid -> its command
    line, parent and environment."""
    found = {}
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        cmdline = _read(f"/proc/{pid}/cmdline").split("\0")
        if f"run.dir={run_dir}" not in cmdline or "megapatch" not in cmdline:
            continue
        ppid = [line for line in _read(f"/proc/{pid}/status").splitlines() if "PPid:" in line]
        environ = (item.partition("=") for item in _read(f"/proc/{pid}/environ").split("\0"))
        found[pid] = {
            "cmdline": cmdline,
            "ppid": int(ppid[0].split()[1]) if ppid else 0,
            "environ": {key: value for key, _, value in environ if key},
        }
    return found


def _ranks_of(run_dir: Path) -> dict[int, dict]:
    """RANK -> environment of each training rank: the children of a node's DeepSpeed
    launcher (a rank's own children, data-loader workers, share its command line; pdsh's
    holds the launcher's as arguments)."""
    procs = _processes_of(run_dir)
    launchers = {
        pid
        for pid, p in procs.items()
        if p["cmdline"][1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    }
    return {
        int(p["environ"]["RANK"]): p["environ"] for p in procs.values() if p["ppid"] in launchers
    }


def _kill_leftovers(run_dir: Path) -> None:
    """After a failure: the run's processes (below sshd, not below the test) by pid."""
    for pid in _processes_of(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _logged_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count("\n") >= 1


def test_sigterm_to_the_script_checkpoints_on_both_nodes(ssh_nodes, tiny_corpus, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots={SLOTS}\n" for host in ssh_nodes.hosts))
    node_of_rank = {rank: ssh_nodes.hosts[rank // SLOTS] for rank in range(2 * SLOTS)}
    run_dir, log = tmp_path / "run", tmp_path / "deepspeed.log"
    env = ssh_nodes.client_env(script_env(MEGAPATCH_COLLECTIVE_TIMEOUT_S="120"))
    argv = [
        "bash",
        str(LAUNCH / "deepspeed.sh"),
        "--hostfile",
        str(hostfile),
        "--master_addr",
        ssh_nodes.hosts[0],
        "--master_port",
        str(free_port()),
        TINY_CONFIG,
        *TINY_OVERRIDES,
        *LAYOUT,
        f"data.path={tiny_corpus}",
        f"run.dir={run_dir}",
        f"train.total_tokens={STEPS * 512}",
        "checkpoint.interval=1000",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 300
        while not _logged_a_step(run_dir):
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        ranks = _ranks_of(run_dir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
        # The script returns only when no rank of the run is left on any node.
        assert _processes_of(run_dir) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_leftovers(run_dir)
    text = log.read_text()

    # Each node's ranks came in over ssh to that node, with the environment forwarded.
    assert sorted(ranks) == [0, 1, 2, 3], text[-4000:]
    for rank, environ in ranks.items():
        assert environ["SSH_CONNECTION"].split()[2] == node_of_rank[rank], (rank, environ)
        assert environ["PATH"] == env["PATH"]
        assert str(REPO) in environ["PYTHONPATH"].split(os.pathsep)
        assert environ["MEGAPATCH_COLLECTIVE_TIMEOUT_S"] == "120"
        assert environ["TORCHDYNAMO_DISABLE"] == environ["OMP_NUM_THREADS"] == "1"
    assert len({e["MEGAPATCH_LAUNCH_ID"] for e in ranks.values()}) == 1
    assert f"2 node(s) x {SLOTS} rank(s) (world 4" in text
    assert f"model parallel: TP={TP} x DP={4 // (TP * PP)} x PP={PP} over 4 ranks" in text

    # The stop went out over ssh to the first node's ranks (with the ranks' agreement at
    # the next step boundary, one node's are enough; the script signals no more).
    assert "deepspeed.sh: received SIGTERM" in text
    asked = [line.split() for line in text.splitlines() if "deepspeed.sh: asked rank" in line]
    # "127.0.0.2: deepspeed.sh: asked rank 1 (pid N) to checkpoint and stop"
    assert sorted(int(words[4]) for words in asked) == [0, 1], text[-4000:]
    assert {words[0] for words in asked} == {f"{ssh_nodes.hosts[0]}:"}

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted"
    (checkpoint,) = (run_dir / "checkpoints").glob("step_*")
    assert (checkpoint / "COMPLETE").exists()
    assert int(checkpoint.name.removeprefix("step_")) == summary["global_step"] < STEPS
    # Every rank wrote its own files: megapatch's rank state, DeepSpeed's ZeRO-1 shard;
    # and the first data-parallel rank of each model-parallel rank (TP x PP of them: with
    # PP = 2 the second stage is the second node's) its model states.
    rank_files = sorted(p.name for p in (checkpoint / "megapatch").glob("rank_*.pt"))
    assert rank_files == [f"rank_{rank:05d}.pt" for rank in range(4)]
    assert len(list(checkpoint.glob("*_optim_states.pt"))) == 4
    model_files = sorted(p.name for p in checkpoint.glob("mp_rank_*_model_states.pt"))
    assert model_files == [f"mp_rank_{rank:02d}_model_states.pt" for rank in range(TP * PP)]
