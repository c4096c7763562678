"""A throwaway one-node SLURM cluster on localhost, for tests of the sbatch scripts.

    cluster = SlurmCluster.start(workdir)     # munged + slurmctld + slurmd, all on 127.0.0.1
    job_id = cluster.sbatch(["launch/slurm/train.sbatch", "configs/tiny.yaml"], cwd=repo)
    state = cluster.wait(job_id)             # "COMPLETED", "FAILED", ...
    cluster.stop()

Debian's `slurm-wlm` and `munge` packages are installed on first use (root and apt-get
needed). Everything else lives under `workdir`: a private munge key and socket, the
daemons' state, spool and logs, and free TCP ports, so the cluster shares nothing with a
system SLURM or with another test run. The daemons run in the foreground as our own
children and are stopped by their process ids.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, or no apt-get)."""


# How long apt waits for a dpkg lock another apt process holds (e.g. a fresh machine's
# unattended upgrades) before giving up, instead of failing at once.
APT_LOCK_TIMEOUT_S = 300
APT_LISTS = Path("/var/lib/apt/lists")
# apt's stderr when the package lists are missing or stale: an `apt-get update` fixes both.
_STALE_LISTS = ("unable to locate package", "has no installation candidate", "failed to fetch")


def apt_command(*args: str) -> list[str]:
    """apt-get, quiet, waiting for the dpkg lock rather than failing on it."""
    return ["apt-get", "-q", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}", *args]


def _have_package_lists(lists: Path) -> bool:
    return lists.is_dir() and any("_Packages" in p.name for p in lists.iterdir())


def apt_install(packages, lists: Path = APT_LISTS) -> None:
    """`apt-get install` the packages (root needed), robust on a fresh machine.

    Runs `apt-get update` first when there are no package lists; on a failed install
    retries once, updating the lists first when apt's error says they are missing or
    stale. Still failing: a RuntimeError with the command, its exit code and apt's last
    stderr lines."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = apt_command("install", "-y", "--no-install-recommends", *packages)
    update = not _have_package_lists(lists)
    for _ in range(2):  # one try, one retry
        steps = [apt_command("update"), install] if update else [install]
        for argv in steps:
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                break
        else:
            return
        update = update or any(s in done.stderr.lower() for s in _STALE_LISTS)
    tail = "\n".join(done.stderr.strip().splitlines()[-10:]) or "(no stderr)"
    raise RuntimeError(
        f"`{' '.join(argv)}` failed with exit {done.returncode} (tried twice); "
        f"apt's last stderr lines:\n{tail}"
    )


def install_packages() -> None:
    """apt-get install slurm-wlm and munge unless their binaries are already there."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster's daemons run as root (SlurmUser=root)")
    if all(shutil.which(b) for b in BINARIES):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm and munge are not installed and apt-get is not available")
    apt_install(PACKAGES)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise RuntimeError(f"apt-get installed {PACKAGES} but these are missing: {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpus_slurmd_sees() -> int:
    """The CPU count slurmd will report (a node configured with more is marked invalid)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
    for item in out.split():
        if item.startswith("CPUs="):
            return int(item.removeprefix("CPUs="))
    return os.cpu_count() or 1


def _fake_device(path: Path) -> None:
    """A character device node like /dev/null (slurmd warns about, but accepts, a plain file)."""
    if path.exists():
        return
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:  # no CAP_MKNOD
        path.touch()


SLURM_CONF = """\
ClusterName=megapatch-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
PlugStackConfig={root}/plugstack.conf
# No cgroups in a container: track processes by parent pid, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to `scontrol show job` (there is no accounting database).
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""

GRES_CONF = "AutoDetect=off\nNodeName={node} Name=gpu File={root}/dev/gpu[0-{last}]\n"
CGROUP_CONF = "CgroupPlugin=autodetect\nIgnoreSystemd=yes\n"


@dataclass
class SlurmCluster:
    root: Path
    node: str
    cpus: int
    gpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and, through sbatch, for the jobs)."""
        return dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    @classmethod
    def start(cls, root: str | os.PathLike, gpus: int = 2, timeout: float = 60.0) -> SlurmCluster:
        install_packages()
        root = Path(root).resolve()
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable paths on the way to its files.
        for path in (root, root / "munge"):
            path.chmod(0o700)
        node = socket.gethostname().split(".")[0]
        cluster = cls(root=root, node=node, cpus=_cpus_slurmd_sees(), gpus=gpus)
        (root / "slurm.conf").write_text(
            SLURM_CONF.format(
                root=root,
                node=node,
                cpus=cluster.cpus,
                gpus=cluster.gpus,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
            )
        )
        (root / "cgroup.conf").write_text(CGROUP_CONF)
        # Stand-in GPUs: slurmd counts gres/gpu by device files; nothing opens them.
        (root / "dev").mkdir(exist_ok=True)
        for i in range(gpus):
            _fake_device(root / "dev" / f"gpu{i}")
        (root / "gres.conf").write_text(GRES_CONF.format(node=node, root=root, last=gpus - 1))
        (root / "plugstack.conf").write_text("")
        try:
            cluster._start_munge()
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(root / "slurm.conf")])
            cluster._spawn("slurmd", ["slurmd", "-D", "-N", node, "-f", str(root / "slurm.conf")])
            cluster._wait_until_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.root / 'munge' / 'munge.socket'}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not (self.root / "munge" / "munge.socket").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket; see {self.root}/log")
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - lives with the daemon
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            out = self.node_state()
            if out in ("idle", "mixed", "allocated"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node not idle after {timeout}s (state {out!r}):\n{self.logs()}"
                )
            time.sleep(0.2)

    def node_state(self) -> str:
        """The node's state as sinfo prints it: idle, mixed, allocated, completing, ..."""
        return self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw
        )

    def sbatch(self, argv: list[str], cwd: str | os.PathLike, env: dict | None = None) -> int:
        """Submit `sbatch --parsable ARGV...` from `cwd`; return the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *argv],
            cwd=cwd,
            env=env or self.env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 180.0, states=None) -> str:
        """Wait until the job reaches one of `states` (default: any final state)."""
        final = states or {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        }
        deadline = time.monotonic() + timeout
        while True:
            state = self.job(job_id)["JobState"]
            if state in final:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout}s:\n{self.logs()}")
            self._check_alive()
            time.sleep(0.5)

    def logs(self, *names: str) -> str:
        parts = []
        for path in sorted((self.root / "log").iterdir()):
            if names and not any(path.name.startswith(n) for n in names):
                continue
            lines = path.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (ours only, by pid)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not self.run(["squeue", "-h"], check=False, timeout=30).stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
