"""Check a launch before anything starts, and work out its shape.

The launch scripts call this once, before they start a single rank:

    python launch/preflight.py --launcher torchrun [--hostfile FILE] [--nnodes N]
        [--node-rank R] [--nproc-per-node N] -- CONFIG [key=value ...]

It reads the config (with megapatch.config, so the overrides mean what they mean to
`megapatch train`), parses the hostfile, counts this node's devices (or reads them from the
SLURM allocation), and checks that the config's `parallel.nodes x parallel.gpus_per_node`
fits what is there. On success it prints shell assignments for `eval`:

    NNODES=2 NPROC_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=gpu-01 HOSTS='gpu-01 gpu-02'
    WORLD_SIZE=16 RUN_DIR=runs/paper-370m-patch DEVICE_KIND=GPU

On bad input it prints one line, `<launcher>: error: ...`, and exits 2.
Standard library plus megapatch.config only: no torch, so it takes well under a second.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class LaunchError(Exception):
    """Bad input to a launch script; the message is one line."""


# --- hostfiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def read_hostfile(path: str) -> list[Host]:
    """Hosts of a DeepSpeed-style hostfile: `HOSTNAME slots=N` per line, `#` comments;
    each host once."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise LaunchError(f"hostfile {path}: no such file") from None
    except OSError as exc:
        raise LaunchError(f"hostfile {path}: cannot read it ({exc.strerror})") from None
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = parts[1].removeprefix("slots=") if len(parts) == 2 else ""
        if (
            len(parts) != 2
            or not parts[1].startswith("slots=")
            or "=" in parts[0]
            or not slots.isdigit()
            or int(slots) < 1
        ):
            raise LaunchError(
                f"hostfile {path} line {number}: expected 'HOSTNAME slots=N' (N >= 1), got {line!r}"
            )
        name = parts[0]
        if name in seen:
            raise LaunchError(
                f"hostfile {path} line {number}: host {name!r} is listed twice "
                f"(first on line {seen[name]}); list each node once"
            )
        seen[name] = number
        hosts.append(Host(name, int(slots), number))
    if not hosts:
        raise LaunchError(f"hostfile {path}: no hosts (expected lines of 'HOSTNAME slots=N')")
    return hosts


def check_hosts_resolve(path: str, hosts: list[Host]) -> None:
    """Every host must have an address: the launcher is about to ssh to each of them."""
    for host in hosts:
        try:
            socket.getaddrinfo(host.name, None)
        except OSError:
            raise LaunchError(
                f"hostfile {path} line {host.line}: host {host.name!r} does not resolve "
                "(not in DNS or /etc/hosts); fix the name or remove the line"
            ) from None


def _addresses(name: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return set()


def this_host_rank(path: str, hosts: list[Host]) -> int:
    """This machine's index in the hostfile, matched by host name or by a (non-loopback)
    address."""
    hostname = socket.gethostname()
    names = {hostname, hostname.split(".")[0], socket.getfqdn()}
    mine = {a for n in names for a in _addresses(n) if not a.startswith("127.") and a != "::1"}
    for index, host in enumerate(hosts):
        if host.name in names or _addresses(host.name) & mine:
            return index
    raise LaunchError(
        f"hostfile {path} does not list this machine ({hostname}): add it, or pass --node_rank"
    )


# --- devices -----------------------------------------------------------------------------


def count_local_devices() -> tuple[int, str]:
    """(count, "GPU") for this node's GPUs (the SLURM allocation's, when inside a job),
    else (CPU count, "CPU")."""
    for var in ("SLURM_GPUS_ON_NODE",):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), "GPU"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1"):
        return len([d for d in visible.split(",") if d.strip()]), "GPU"
    if visible is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
            ).stdout
            gpus = sum(1 for line in out.splitlines() if line.startswith("GPU "))
            if gpus:
                return gpus, "GPU"
        except (OSError, subprocess.TimeoutExpired):
            pass
    cpus = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if cpus.isdigit():
        return int(cpus), "CPU"
    return len(os.sched_getaffinity(0)), "CPU"


# --- the launch shape --------------------------------------------------------------------


def resolve_shape(
    cfg,
    *,
    nodes_available: int,
    where_nodes: str,
    devices_per_node: int,
    device_kind: str,
    where_devices: str,
    nproc_requested: int | None,
    exact_nodes: bool,
) -> tuple[int, int]:
    """(nodes, ranks per node) for this config on what the launch has.

    A config that sets parallel.gpus_per_node fixes the shape (nodes x gpus_per_node) and
    must fit; without it, the launch decides (one rank per GPU, or one on a CPU node).
    """
    source = cfg.source
    want_nodes, want_per_node = cfg.parallel.nodes, cfg.parallel.gpus_per_node
    if want_per_node is None:
        nnodes = nodes_available
        nproc = nproc_requested or (devices_per_node if device_kind == "GPU" else 1)
        what = f"{nproc} ranks per node"
    else:
        per_node_from = cfg.provenance.get("parallel.gpus_per_node", source)
        nodes_from = cfg.provenance.get("parallel.nodes", source)
        if want_nodes > nodes_available or (exact_nodes and want_nodes != nodes_available):
            raise LaunchError(
                f"{nodes_from}: parallel.nodes={want_nodes} (x parallel.gpus_per_node="
                f"{want_per_node}) but {where_nodes} has {nodes_available} node(s): set "
                f"parallel.nodes={nodes_available} or launch on {want_nodes} node(s)"
            )
        if nproc_requested and nproc_requested != want_per_node:
            raise LaunchError(
                f"{per_node_from}: parallel.gpus_per_node={want_per_node} but the launch asks "
                f"for {nproc_requested} ranks per node: drop the launcher option or change the config"
            )
        nnodes, nproc = want_nodes, want_per_node
        what = f"parallel.gpus_per_node={want_per_node} ({per_node_from})"
    # CPU ranks may share cores (tests, laptops); a GPU rank needs a GPU of its own.
    if device_kind == "GPU" and nproc > devices_per_node:
        raise LaunchError(
            f"{what} asks for {nproc} GPUs per node but {where_devices} has only "
            f"{devices_per_node} GPU(s)"
        )
    return nnodes, nproc


def preflight(args: argparse.Namespace) -> dict[str, str]:
    from megapatch.config import load_config
    from megapatch.errors import MegapatchError
    from megapatch.training.schedule import plan_for_world

    if not args.config:
        raise LaunchError("no config given: pass CONFIG [key=value ...] after the options")
    try:
        cfg = load_config(args.config[0], args.config[1:])
    except MegapatchError as exc:
        raise LaunchError(str(exc)) from None

    hosts: list[Host] = []
    node_rank = args.node_rank
    master_addr = args.master_addr
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
        if args.ssh:
            check_hosts_resolve(args.hostfile, hosts)
        master_addr = master_addr or hosts[0].name

    in_slurm = args.launcher == "slurm"
    if in_slurm:
        nodes_available = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ["SLURM_NNODES"])
        where_nodes = f"the allocation (job {os.environ.get('SLURM_JOB_ID', '?')})"
    elif hosts:
        nodes_available = len(hosts)
        where_nodes = f"hostfile {args.hostfile}"
    else:
        nodes_available = args.nnodes or 1
        where_nodes = f"--nnodes {args.nnodes}" if args.nnodes else "this single-node launch"
    if hosts and args.nnodes:
        if args.nnodes > len(hosts):
            raise LaunchError(
                f"hostfile {args.hostfile} lists {len(hosts)} host(s) but the launch asks for "
                f"{args.nnodes} nodes"
            )
        nodes_available = args.nnodes

    if hosts and args.ssh:
        # The slots are each host's GPUs (this machine cannot see them); the launcher
        # starts the same number of ranks on every host.
        devices, kind = min(h.slots for h in hosts[:nodes_available]), "GPU"
        where_devices = f"a host of hostfile {args.hostfile} (slots={devices})"
    else:
        devices, kind = count_local_devices()
        where_devices = "each node of the allocation" if in_slurm else "this node"

    nnodes, nproc = resolve_shape(
        cfg,
        nodes_available=nodes_available,
        where_nodes=where_nodes,
        devices_per_node=devices,
        device_kind=kind,
        where_devices=where_devices,
        nproc_requested=args.nproc_per_node,
        exact_nodes=in_slurm or bool(args.nnodes),
    )
    if hosts and not args.ssh and node_rank is None and not in_slurm and nnodes > 1:
        node_rank = this_host_rank(args.hostfile, hosts[:nnodes])
    if nnodes > 1 and node_rank is None and not in_slurm and not args.ssh:
        raise LaunchError(
            f"{nnodes} nodes need --node_rank (this node's index, 0 to {nnodes - 1}) or a "
            "--hostfile that lists this machine"
        )
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node_rank {node_rank}: expected 0 to {nnodes - 1} for {nnodes} nodes")
    if nnodes > 1 and not master_addr and not in_slurm and not args.ssh:
        raise LaunchError(
            f"{nnodes} nodes need --master_addr (the address of node 0) or a --hostfile"
        )
    try:
        plan_for_world(cfg, nnodes * nproc)
    except MegapatchError as exc:
        raise LaunchError(str(exc)) from None

    out = {
        "NNODES": str(nnodes),
        "NPROC_PER_NODE": str(nproc),
        "WORLD_SIZE": str(nnodes * nproc),
        "DEVICE_KIND": kind,
        "RUN_DIR": cfg.run.dir,
        "HOSTS": " ".join(h.name for h in hosts[:nnodes]),
    }
    if nnodes == 1:  # a port nobody uses, so several single-node runs can share a machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            out["FREE_PORT"] = str(s.getsockname()[1])
    if node_rank is not None:
        out["NODE_RANK"] = str(node_rank)
    if master_addr:
        out["MASTER_ADDR"] = master_addr
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed", "slurm"), required=True)
    parser.add_argument("--prog", help="name for error messages (default: the launcher)")
    parser.add_argument("--hostfile")
    parser.add_argument("--ssh", action="store_true", help="the launcher will ssh to the hosts")
    parser.add_argument("--nnodes", type=int)
    parser.add_argument("--node-rank", type=int)
    parser.add_argument("--nproc-per-node", type=int)
    parser.add_argument("--master-addr")
    parser.add_argument("config", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.config and args.config[0] == "--":
        args.config = args.config[1:]
    try:
        for flag in ("nnodes", "nproc_per_node"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise LaunchError(f"--{flag} {value}: expected at least 1")
        values = preflight(args)
    except LaunchError as exc:
        print(f"{args.prog or args.launcher}: error: {exc}", file=sys.stderr)
        return 2
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
