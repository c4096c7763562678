"""One harness for tests that need real process groups: spawn N gloo processes.

    def _body(rank, world_size, x):          # a module-level function (spawn pickles it)
        ...
        return something_picklable

    results = run_distributed(_body, 2, x)   # one result per rank, in rank order

An exception in any rank fails the test with that rank's traceback; a hang fails it
after `timeout` seconds instead of hanging CI.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, env, results):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        **env,
    )
    torch.set_num_threads(1)  # N processes share 2 cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensor data inline; the queue's own pickler would hand over
        # shared memory that vanishes when this process exits.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, env or {}, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                raise AssertionError(
                    f"distributed test timed out after {timeout}s; ranks with a bad exit: {dead}"
                ) from None
            if ok:
                outputs[rank] = pickle.loads(value)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("a distributed rank failed:\n" + "\n".join(errors))
    return [outputs[r] for r in range(world_size)]
