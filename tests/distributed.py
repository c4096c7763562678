"""One harness for tests that need real process groups: spawn N gloo processes.

    def _body(rank, world_size, x):          # a module-level function (spawn pickles it)
        ...
        return something_picklable

    results = run_distributed(_body, 2, x)   # one result per rank, in rank order

An exception in any rank fails the test with that rank's traceback; a hang fails it
after `timeout` seconds instead of hanging CI.

Starting N interpreters that import torch costs seconds of CPU each, far more than most
bodies. With `reuse_workers=True` the call runs in a group of N processes kept alive for
later calls of the same size and environment (until the session ends, or a call fails or
times out, which discards the group): for bodies that leave the process as they found
it, i.e. destroy the TP/DP groups they initialise and change no process-wide setting.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import socket
import time
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
    reuse_workers: bool = False,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return results by
    rank. `reuse_workers`: in processes kept for later calls (see the module docstring)."""
    if reuse_workers:
        return _run_in_worker_group(fn, world_size, args, timeout, env or {})
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


def _serve(rank, world_size, port, env, tasks, results):
    """A reusable worker: join the gloo group once, then run bodies until told to stop."""
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
    except BaseException:  # noqa: BLE001 - reported to the parent, which discards the group
        results.put((None, rank, False, traceback.format_exc()))
        return
    try:
        while (task := tasks.get()) is not None:
            call, payload = task
            try:
                fn, args = pickle.loads(payload)
                results.put((call, rank, True, pickle.dumps(fn(rank, world_size, *args))))
            except BaseException:  # noqa: BLE001 - reported to the parent
                results.put((call, rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _WorkerGroup:
    """`world_size` gloo processes that run one body after another."""

    def __init__(self, world_size: int, env: dict[str, str]):
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world_size, port, env, self.tasks[r], self.results))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.calls = 0

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
        """Run `fn` on every rank; raises AssertionError (group unusable) on any failure."""
        self.calls += 1
        payload = pickle.dumps((fn, args))  # plain copies: nothing shared with this process
        for tasks in self.tasks:
            tasks.put((self.calls, payload))
        outputs: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(outputs) < len(self.procs):
            try:
                call, rank, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    what = f"ranks {dead} exited" if dead else f"timed out after {timeout}s"
                    raise AssertionError(f"distributed test {what}") from None
                continue
            if not ok:
                raise AssertionError(f"a distributed rank failed:\n--- rank {rank} ---\n{value}")
            if call == self.calls:
                outputs[rank] = pickle.loads(value)
        return [outputs[r] for r in range(len(self.procs))]

    def close(self) -> None:
        for tasks, p in zip(self.tasks, self.procs):
            if p.is_alive():
                tasks.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


_worker_groups: dict[tuple, _WorkerGroup] = {}


def _run_in_worker_group(fn, world_size, args, timeout, env) -> list[Any]:
    key = (world_size, tuple(sorted(env.items())))
    group = _worker_groups.get(key)
    if group is None:
        group = _worker_groups[key] = _WorkerGroup(world_size, env)
    try:
        return group.run(fn, args, timeout)
    except BaseException:
        # A failed or hung body may leave the group mid-collective: never reuse it.
        del _worker_groups[key]
        for p in group.procs:
            p.kill()
        group.close()
        raise


@atexit.register
def close_worker_groups() -> None:
    """Stop every kept worker group (also at exit: they would block the interpreter's)."""
    while _worker_groups:
        _worker_groups.popitem()[1].close()
