"""Two ssh "nodes" on this machine, for tests of launch/deepspeed.sh's ssh mode.

    nodes = SshNodes.start(workdir)   # one sshd on 127.0.0.2 and 127.0.0.3, a free port
    env = nodes.client_env(env)       # ssh (and pdsh through it) log in there with a key
    nodes.stop()

Debian's `openssh-server`, `openssh-client` and `pdsh` are installed on first use (root and
apt-get needed; `apt_install` of slurm_cluster). Everything else lives under `workdir`: a
throwaway host key and user key pair, sshd's own config, pid file and log, the authorized
key, a known_hosts file and an ssh client config (and, for an sshd run as root, the empty
/run/sshd it insists on, made if missing). sshd runs in the foreground as our child and is
stopped by its process id. It accepts only that key, only for the current user.

Nothing of the system's ssh setup or of ~/.ssh is read or written. The client side is an
`ssh` first on PATH that runs the real one with `-F` our config: the DeepSpeed launcher runs
plain `ssh HOST` (its reachability check) and pdsh's ssh module runs `ssh` from PATH, so the
launch scripts and DeepSpeed run unchanged, as on a cluster where ~/.ssh/config and the
known hosts are set up.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.launch.slurm_cluster import apt_install

PACKAGES = ("openssh-server", "openssh-client", "pdsh")
ADDRESSES = ("127.0.0.2", "127.0.0.3")  # Linux routes all of 127/8 to the loopback device
# sshd as root needs its privilege-separation directory (made by the system's ssh service
# when it starts; absent on a machine that never ran one). Made if missing and left there:
# an empty runtime directory, which another sshd started meanwhile (another test session)
# needs at each login.
PRIVSEP_DIR = Path("/run/sshd")


class SshUnavailable(RuntimeError):
    """This machine cannot host the test nodes (not root and the packages missing)."""


def _find(name: str) -> str | None:
    # sshd is in /usr/sbin, which a non-root PATH often leaves out.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def install_packages() -> dict[str, str]:
    """The paths of sshd, ssh, ssh-keygen and pdsh, apt-get installing what is missing."""
    names = ("sshd", "ssh", "ssh-keygen", "pdsh")
    if not all(_find(n) for n in names):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SshUnavailable(
                f"{', '.join(PACKAGES)} are not all installed, and installing them needs "
                "root and apt-get"
            )
        apt_install(PACKAGES)
    found = {n: _find(n) for n in names}
    missing = [n for n, path in found.items() if path is None]
    if missing:
        raise RuntimeError(f"apt-get installed {PACKAGES} but these are missing: {missing}")
    return found


def _free_port() -> int:
    """A TCP port free on both addresses."""
    while True:
        with socket.socket() as first:
            first.bind((ADDRESSES[0], 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind((ADDRESSES[1], port))
                except OSError:
                    continue
                return port


def _keygen(keygen: str, path: Path, comment: str) -> str:
    """A new ed25519 key pair without passphrase at path (and path.pub); the public key."""
    for old in (path, path.with_suffix(".pub")):
        old.unlink(missing_ok=True)  # ssh-keygen would ask before overwriting
    done = subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed ({done.returncode}): {done.stderr.strip()}")
    return path.with_suffix(".pub").read_text().strip()


SSHD_CONFIG = """\
ListenAddress {address0}:{port}
ListenAddress {address1}:{port}
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers {user}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# No PAM: its session modules (pam_loginuid) refuse logins inside many containers.
UsePAM no
# The key files are ours and private; the temp dir's parents (/tmp) are world-writable.
StrictModes no
PermitUserEnvironment no
AllowAgentForwarding no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
"""

SSH_CONFIG = """\
Host {address0} {address1}
    Port {port}
    User {user}
    IdentityFile {root}/user_key
    IdentitiesOnly yes
    UserKnownHostsFile {root}/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
"""


@dataclass
class SshNodes:
    root: Path
    port: int
    user: str
    proc: subprocess.Popen | None = None
    hosts: tuple[str, ...] = ADDRESSES
    _tools: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, root: str | os.PathLike, timeout: float = 30.0) -> SshNodes:
        tools = install_packages()
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        user = pwd.getpwuid(os.getuid()).pw_name
        nodes = cls(root=root, port=0, user=user, _tools=tools)
        try:
            nodes._write_keys()
            nodes._start_sshd(timeout)
            nodes._write_client()
            for host in nodes.hosts:
                nodes.check_login(host)
        except BaseException:
            nodes.stop()
            raise
        return nodes

    def _write_keys(self) -> None:
        keygen = self._tools["ssh-keygen"]
        host_key = _keygen(keygen, self.root / "host_key", "megapatch-test-host")
        (self.root / "host_key.pub").write_text(host_key + "\n")
        user_key = _keygen(keygen, self.root / "user_key", "megapatch-test-user")
        # Only from the loopback addresses, and for nothing but a command.
        options = 'from="127.0.0.0/8",no-agent-forwarding,no-port-forwarding,no-X11-forwarding'
        authorized = self.root / "authorized_keys"
        authorized.write_text(f"{options} {user_key}\n")
        authorized.chmod(0o600)

    def _start_sshd(self, timeout: float) -> None:
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for _ in range(3):  # another process may take the free port before sshd binds it
            self.port = _free_port()
            (self.root / "sshd_config").write_text(
                SSHD_CONFIG.format(
                    root=self.root,
                    user=self.user,
                    port=self.port,
                    address0=self.hosts[0],
                    address1=self.hosts[1],
                )
            )
            log = self.root / "sshd.log"
            self.proc = subprocess.Popen(
                [self._tools["sshd"], "-D", "-f", str(self.root / "sshd_config"), "-E", str(log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and not self._listening():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd not listening after {timeout}s:\n{self.log()}")
                time.sleep(0.05)
            if self.proc.poll() is None:
                return
            if "Address already in use" not in self.log():
                break
        raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log()}")

    def _listening(self) -> bool:
        for host in self.hosts:
            try:
                socket.create_connection((host, self.port), timeout=1).close()
            except OSError:
                return False
        return True

    def _write_client(self) -> None:
        key = (self.root / "host_key.pub").read_text().split()[:2]
        (self.root / "known_hosts").write_text(
            "".join(f"[{host}]:{self.port} {' '.join(key)}\n" for host in self.hosts)
        )
        (self.root / "ssh_config").write_text(
            SSH_CONFIG.format(
                root=self.root,
                user=self.user,
                port=self.port,
                address0=self.hosts[0],
                address1=self.hosts[1],
            )
        )
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        ssh = bin_dir / "ssh"
        ssh.write_text(
            "#!/bin/sh\n"
            "# The real ssh with the test nodes' client config (and nothing of ~/.ssh).\n"
            f'exec {shlex.quote(self._tools["ssh"])} -F {shlex.quote(str(self.root / "ssh_config"))} "$@"\n'
        )
        ssh.chmod(0o755)

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """env with our `ssh` first on PATH (pdsh found beside the system's tools)."""
        pdsh_dir = str(Path(self._tools["pdsh"]).parent)
        path = os.pathsep.join([str(self.root / "bin"), env.get("PATH", ""), pdsh_dir])
        return {**env, "PATH": path}

    def check_login(self, host: str) -> None:
        """One `ssh HOST true` as the launchers run it; on failure, sshd's log."""
        done = subprocess.run(
            ["ssh", host, "true"],
            env=self.client_env(dict(os.environ)),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"ssh {host} as {self.user} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"sshd's log:\n{self.log()}"
            )

    def log(self) -> str:
        path = self.root / "sshd.log"
        lines = path.read_text(errors="replace").splitlines()[-30:] if path.exists() else []
        return "\n".join(lines) or "(empty)"

    def stop(self) -> None:
        """Stop our sshd (by pid)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
