"""Start the process group the same way under every launcher.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; `srun`
sets SLURM_* (the sbatch script exports MASTER_ADDR/MASTER_PORT); a plain process
sets nothing and becomes a world of one.

Every collective is bounded by one timeout (train.collective_timeout_s, default 600 s; the
environment variable MEGAPATCH_COLLECTIVE_TIMEOUT_S, when set, overrides it): when a rank
dies or hangs, the others fail within it instead of waiting forever, and
`rank_failures_reported` turns that failure into one clear line naming the timeout and
where it came from.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megapatch.errors import ConfigError, MegapatchError

TIMEOUT_ENV = "MEGAPATCH_COLLECTIVE_TIMEOUT_S"
TIMEOUT_KEY = "train.collective_timeout_s"
DEFAULT_TIMEOUT_S = 600.0
# The bound the process group was started with, and what set it (named in errors).
_timeout_s = DEFAULT_TIMEOUT_S
_timeout_source = TIMEOUT_KEY


class RankFailureError(MegapatchError):
    """A collective failed: another rank died or stopped responding."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adopt_slurm_env() -> None:
    """Map srun's variables onto torch's when the job was started by srun directly."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault(
        "LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    )
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            "started by srun but MASTER_ADDR is not set: export MASTER_ADDR (first host of "
            "$SLURM_JOB_NODELIST) and MASTER_PORT, as launch/slurm/train.sbatch does"
        )
    os.environ.setdefault("MASTER_PORT", "29500")


def collective_timeout_s(configured_s: float | None = None) -> float:
    """The collective timeout in seconds; see `resolve_collective_timeout`."""
    return resolve_collective_timeout(configured_s)[0]


def resolve_collective_timeout(configured_s: float | None = None) -> tuple[float, str]:
    """(seconds, where they came from): MEGAPATCH_COLLECTIVE_TIMEOUT_S when set (cluster
    admins set it in job scripts, so it wins), else `configured_s` (the validated
    train.collective_timeout_s), else 600."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return (DEFAULT_TIMEOUT_S if configured_s is None else configured_s), TIMEOUT_KEY
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds (the variable "
            f"overrides {TIMEOUT_KEY}; unset it to use the config's value)"
        )
    return seconds, TIMEOUT_ENV


def set_collective_timeout(seconds: float, source: str) -> None:
    """Bound the collectives of groups made from now on (and name the bound and its
    `source`, a config key or variable, in errors).

    Groups made with new_group (TP/DP, DeepSpeed's own) take torch's 30-minute default,
    not the world group's timeout: make them inherit ours, so a dead or hung peer fails
    every collective within the same bound.
    """
    global _timeout_s, _timeout_source
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, timeout)
    _timeout_s, _timeout_source = seconds, source


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """Initialise torch.distributed (via DeepSpeed) for whatever launched us; idempotent.

    `timeout_s` (train.collective_timeout_s; None: 600 s) bounds every collective;
    MEGAPATCH_COLLECTIVE_TIMEOUT_S, when set, overrides it.
    """
    import deepspeed

    timeout_s, source = resolve_collective_timeout(timeout_s)
    _adopt_slurm_env()
    if "RANK" not in os.environ:  # a plain single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device_count = torch.cuda.device_count()
        if local_rank >= device_count:
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this node has {device_count} GPU(s); "
                "start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        set_collective_timeout(timeout_s, source)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
        backend=backend,
    )


def all_ranks_agree(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny MAX all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# How gloo and NCCL word a peer that is gone or too slow (they raise plain RuntimeErrors).
_PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed collective (a peer gone or too slow), not a bug here."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in _PEER_LOST)


def _cause(exc: BaseException) -> str:
    """'Connection closed by peer [127.0.0.1]:4242' from gloo's '[.../pair.cc:553] Connection
    closed by peer [127.0.0.1]:4242. This is typically caused by ...'."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def rank_failures_reported(where: Callable[[], str]) -> Iterator[None]:
    """Turn a failed collective into RankFailureError: one line naming this rank, the cause,
    the timeout and `where()` (e.g. the step and the checkpoint to restart from)."""
    try:
        yield
    except RuntimeError as exc:
        if not (dist.is_initialized() and dist.get_world_size() > 1 and is_collective_failure(exc)):
            raise
        raise RankFailureError(
            f"rank {dist.get_rank()} lost contact with the other ranks ({_cause(exc)}): another rank "
            f"died, or stopped responding for longer than the collective timeout of {_timeout_s:g} s "
            f"({_timeout_source}); stopped {where()}"
        ) from exc
