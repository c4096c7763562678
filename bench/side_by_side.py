"""Run commands at the same time, each pinned to its own core.

Ratios of two runs' times are what the benchmarks report, and these machines are shared:
run one after the other, two arms meet different load. Side by side, whatever else the
machine does slows both alike.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def run_side_by_side(commands: list[list[str]], cwd: Path, env: dict | None = None) -> None:
    """Start every command at once (core i for command i when there are enough cores),
    wait for all, and raise SystemExit naming the first that failed."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs = []
    for i, cmd in enumerate(commands):
        core = {cores[i]} if len(cores) >= len(commands) else None
        pin = (lambda c=core: os.sched_setaffinity(0, c)) if core else None
        procs.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=pin,
            )
        )  # fmt: skip
    failed = []
    for cmd, proc in zip(commands, procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(
                f"{' '.join(cmd[:6])} ... exited {proc.returncode}: {err.decode()[-2000:]}"
            )
    if failed:
        raise SystemExit("side_by_side: " + "\n".join(failed))
