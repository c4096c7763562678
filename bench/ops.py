"""Benchmark the patch ops on CPU: peak memory and time of forward+backward per backend.

    python bench/ops.py                 # N=8192, V=32000, D=1024, K=4, fp32
    python bench/ops.py --quick         # small shapes, a smoke run

Memory: each case runs once in a fresh subprocess; its peak is the kernel's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) during that first
forward+backward, minus the resident set just before it. Inputs are excluded; everything
the op and its gradients allocate is counted.

Time: the cases of one op run interleaved, round after round, in one more subprocess, and
each case reports its median. Interleaving keeps ratios fair on a shared machine, where
the load changes while the benchmark runs. A case too slow to repeat (marked "once") is
timed by its memory run alone. Writes bench/results/ops.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# case -> (description, timed in the interleaved rounds?)
LOSS_CASES = {
    "reference": ("patch_loss, reference (full fp32 logits)", True),
    "torch": ("patch_loss, torch (chunked, grads in forward)", True),
    "torch-weighted": ("patch_loss, torch, power-law position weights", True),
    "torch-recompute": ("patch_loss, torch (chunked, recompute in backward)", True),
    "F.linear_cross_entropy": ("F.linear_cross_entropy chunked, rows repeated K×", False),
}
EMBEDDING_CASES = {
    "reference": ("patch_embedding, reference", True),
    "torch": ("patch_embedding, torch", True),
    "F.embedding_bag": ("F.embedding_bag(mode='mean') + autograd", True),
    "view-mean": ("F.embedding(...).view(..., K, D).mean(-2)", True),
}
CASES = {"loss": LOSS_CASES, "embedding": EMBEDDING_CASES}
BASELINE = {"loss": "reference", "embedding": "F.embedding_bag"}


# ----------------------------------------------------------------------------- in a subprocess


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _make_steps(op: str, n: int, v: int, d: int, k: int) -> dict:
    """One forward+backward closure per case, all on the same inputs."""
    import torch
    import torch.nn.functional as F

    from megapatch.ops import chunked, patch_embedding, patch_loss

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, d, generator=g) * 0.02).requires_grad_()
    if op == "loss":
        hidden = torch.randn(n, d, generator=g).requires_grad_()
        targets = torch.randint(0, v, (n, k), generator=g)
        power_law = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)  # [K]

        def loss_step(backend):
            def step():
                hidden.grad = weight.grad = None
                chunked.FUSE_GRAD_IN_FORWARD = backend != "torch-recompute"
                if backend == "F.linear_cross_entropy":
                    rows = hidden.repeat_interleave(k, dim=0)  # [N·K, D]: one row per target
                    options = torch.nn.LinearCrossEntropyOptions()
                    loss = F.linear_cross_entropy(
                        rows, weight, targets.reshape(-1), options=options
                    )
                else:
                    impl = backend.split("-")[0]  # torch-recompute and torch-weighted: torch
                    weights = power_law if backend == "torch-weighted" else None
                    loss = patch_loss(
                        hidden, weight, targets, position_weights=weights, backend=impl
                    )
                loss.backward()

            return step

        return {backend: loss_step(backend) for backend in LOSS_CASES}

    ids = torch.randint(0, v, (n, k), generator=g)
    grad_out = torch.randn(n, d, generator=g)

    def embedding_step(backend):
        def step():
            weight.grad = None
            if backend == "F.embedding_bag":
                out = F.embedding_bag(ids, weight, mode="mean")
            elif backend == "view-mean":  # what the paper's code does
                out = F.embedding(ids.reshape(-1), weight).view(n, k, d).mean(-2)
            else:
                out = patch_embedding(ids, weight, backend=backend)
            out.backward(grad_out)

        return step

    return {backend: embedding_step(backend) for backend in EMBEDDING_CASES}


def measure_memory(op: str, backend: str, n: int, v: int, d: int, k: int) -> dict:
    import gc

    step = _make_steps(op, n, v, d, k)[backend]
    gc.collect()
    exact = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    # Without clear_refs the peak includes imports: an upper bound, flagged in the output.
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - before) / 1024, "peak_exact": exact, "first_step_s": elapsed}


def measure_time(op: str, n: int, v: int, d: int, k: int, rounds: int) -> dict:
    steps = _make_steps(op, n, v, d, k)
    timed = [b for b, (_, interleave) in CASES[op].items() if interleave]
    for backend in timed:  # warm-up
        steps[backend]()
    times: dict[str, list[float]] = {backend: [] for backend in timed}
    for _ in range(rounds):
        for backend in timed:
            start = time.perf_counter()
            steps[backend]()
            times[backend].append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- driver


def _subprocess(args, *extra) -> dict:
    cmd = [sys.executable, __file__, *extra]
    cmd += ["--n", str(args.n), "--v", str(args.v), "--d", str(args.d), "--k", str(args.k)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="rows (patches)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary")
    parser.add_argument("--d", type=int, default=1024, help="model width")
    parser.add_argument("--k", type=int, default=4, help="patch size")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--only", choices=list(CASES), help="run one op only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ops.json"))
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # op:backend, in a subprocess
    parser.add_argument("--time", help=argparse.SUPPRESS)  # op, in a subprocess
    args = parser.parse_args()
    if args.quick:
        args.n, args.v, args.d = 512, 4000, 256

    if args.memory:
        op, backend = args.memory.split(":", 1)
        print(json.dumps(measure_memory(op, backend, args.n, args.v, args.d, args.k)))
        return
    if args.time:
        print(json.dumps(measure_time(args.time, args.n, args.v, args.d, args.k, args.rounds)))
        return

    import torch

    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    results = []
    for op, cases in CASES.items():
        if args.only and op != args.only:
            continue
        rounds = args.rounds or (3 if op == "loss" else 15)
        rows = {b: {"op": op, "backend": b, "label": label} for b, (label, _) in cases.items()}
        for backend, row in rows.items():
            row.update(_subprocess(args, "--memory", f"{op}:{backend}"))
        times = _subprocess(args, "--time", op, "--rounds", str(rounds))
        for backend, row in rows.items():
            if backend in times:
                row["times_s"] = times[backend]
                row["time_s"] = statistics.median(times[backend])
                row["timing"] = f"median of {rounds} interleaved"
            elif "first_step_s" in row:
                row["time_s"] = row["first_step_s"]
                row["timing"] = "once"
        base = rows[BASELINE[op]]
        for row in rows.values():
            for key, ratio in (("peak_mib", "mem_vs_base"), ("time_s", "time_vs_base")):
                ok = key in row and key in base and base[key] > 0
                row[ratio] = row[key] / base[key] if ok else None
        results.extend(rows.values())

    print(
        f"\nN={args.n} V={args.v} D={args.d} K={args.k} fp32, forward+backward, CPU, {threads} threads"
    )
    header = f"{'case':52s} {'peak MiB':>9s} {'time s':>8s} {'mem/base':>9s} {'time/base':>9s}"
    for op in CASES:
        rows = [r for r in results if r["op"] == op]
        if not rows:
            continue
        print(f"\n{op} (base: {BASELINE[op]})\n{header}")
        for row in rows:
            if "error" in row or "time_s" not in row:
                print(f"{row['label']:52s} failed: {row.get('error', 'no timing')}")
                continue
            note = "  (timed once)" if row["timing"] == "once" else ""
            print(
                f"{row['label']:52s} {row['peak_mib']:9.1f} {row['time_s']:8.3f} "
                f"{_fmt(row['mem_vs_base']):>9s} {_fmt(row['time_vs_base']):>9s}{note}"
            )
    load = (load_before, os.getloadavg()[0])
    print(f"\nload average before/after: {load[0]:.1f}/{load[1]:.1f} (on {os.cpu_count()} CPUs)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = {"n": args.n, "v": args.v, "d": args.d, "k": args.k, "dtype": "float32"}
    meta = {"threads": threads, "cpus": os.cpu_count(), "load_average_before_after": load}
    out.write_text(
        json.dumps({"shape": shape, "machine": meta, "results": results}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
