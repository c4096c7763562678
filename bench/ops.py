"""Benchmark the patch ops on CPU: peak memory and time of forward+backward per backend.

    python bench/ops.py                 # N=8192, V=32000, D=1024, K=4, fp32
    python bench/ops.py --quick         # small shapes, a smoke run

Each case runs in a fresh subprocess so its memory high-water mark is its own. Peak
memory is the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) during the first forward+backward, minus the resident set just
before it: the inputs are excluded, everything the op and its gradients allocate is
counted. Time is the best of a few further iterations. Ratios come from the same run.
Writes bench/results/ops.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOSS_CASES = {
    "reference": "patch_loss, reference (full fp32 logits)",
    "torch": "patch_loss, torch (chunked, grads in forward)",
    "torch-recompute": "patch_loss, torch (chunked, recompute in backward)",
    "F.linear_cross_entropy": "F.linear_cross_entropy, chunked, rows repeated K×",
}
EMBEDDING_CASES = {
    "reference": "patch_embedding, reference",
    "torch": "patch_embedding, torch",
    "F.embedding_bag": "F.embedding_bag(mode='mean') + autograd",
    "view-mean": "F.embedding(...).view(..., K, D).mean(-2)",
}


# ----------------------------------------------------------------------------- one case


def _rss_kib(field: str) -> int:
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


def _peak_kib(can_reset: bool) -> int:
    if can_reset:
        return _rss_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never reset: an upper bound


def _make_step(op: str, backend: str, n: int, v: int, d: int, k: int):
    import torch
    import torch.nn.functional as F

    from megapatch.ops import chunked, patch_embedding, patch_loss

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, d, generator=g) * 0.02).requires_grad_()
    if op == "loss":
        hidden = torch.randn(n, d, generator=g).requires_grad_()
        targets = torch.randint(0, v, (n, k), generator=g)

        def loss_fn():
            if backend == "F.linear_cross_entropy":
                options = torch.nn.LinearCrossEntropyOptions()
                rows = hidden.repeat_interleave(k, dim=0)  # [N·K, D]: one row per target
                return F.linear_cross_entropy(rows, weight, targets.reshape(-1), options=options)
            if backend == "torch-recompute":
                chunked.FUSE_GRAD_IN_FORWARD = False  # the vocab-parallel path's schedule
                return patch_loss(hidden, weight, targets, backend="torch")
            return patch_loss(hidden, weight, targets, backend=backend)

        def step():
            hidden.grad = weight.grad = None
            loss_fn().backward()

    else:
        ids = torch.randint(0, v, (n, k), generator=g)
        grad_out = torch.randn(n, d, generator=g)

        def embed():
            if backend == "F.embedding_bag":
                return F.embedding_bag(ids, weight, mode="mean")
            if backend == "view-mean":
                return F.embedding(ids.reshape(-1), weight).view(n, k, d).mean(-2)
            return patch_embedding(ids, weight, backend=backend)

        def step():
            weight.grad = None
            embed().backward(grad_out)

    return step


def run_case(op: str, backend: str, n: int, v: int, d: int, k: int, repeats: int) -> dict:
    import gc

    import torch

    step = _make_step(op, backend, n, v, d, k)
    gc.collect()
    can_reset = _reset_peak()
    before = _rss_kib("VmRSS")
    step()  # first iteration: memory
    peak = _peak_kib(can_reset) - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "op": op,
        "backend": backend,
        "peak_mib": peak / 1024,
        "time_s": min(times),
        "times_s": times,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- driver


def _spawn(op, backend, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        f"{op}:{backend}",
        *("--n", str(args.n), "--v", str(args.v), "--d", str(args.d), "--k", str(args.k)),
        *("--repeats", str(args.repeats if op == "loss" else args.repeats * 10)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"op": op, "backend": backend, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="rows (patches)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary")
    parser.add_argument("--d", type=int, default=1024, help="model width")
    parser.add_argument("--k", type=int, default=4, help="patch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed iterations of patch_loss")
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--only", choices=["loss", "embedding"], help="run one op only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ops.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.v, args.d = 512, 4000, 256

    if args.case:
        op, backend = args.case.split(":", 1)
        print(json.dumps(run_case(op, backend, args.n, args.v, args.d, args.k, args.repeats)))
        return

    results = []
    for op, cases in (("loss", LOSS_CASES), ("embedding", EMBEDDING_CASES)):
        if args.only and op != args.only:
            continue
        for backend in cases:
            results.append(_spawn(op, backend, args))

    def ratio(row, base_backend, key):
        base = next(
            (r for r in results if r["op"] == row["op"] and r["backend"] == base_backend), None
        )
        if base is None or "error" in base or "error" in row or base[key] <= 0:
            return None
        return row[key] / base[key]

    print(f"\nN={args.n} V={args.v} D={args.d} K={args.k} fp32, forward+backward, CPU")
    header = f"{'case':52s} {'peak MiB':>9s} {'time s':>8s} {'mem/base':>9s} {'time/base':>9s}"
    for op, base_backend, cases in (
        ("loss", "reference", LOSS_CASES),
        ("embedding", "F.embedding_bag", EMBEDDING_CASES),
    ):
        rows = [r for r in results if r["op"] == op]
        if not rows:
            continue
        print(f"\n{op} (base: {base_backend})\n{header}")
        for row in rows:
            label = cases[row["backend"]]
            if "error" in row:
                print(f"{label:52s} failed: {row['error']}")
                continue
            row["mem_vs_base"] = ratio(row, base_backend, "peak_mib")
            row["time_vs_base"] = ratio(row, base_backend, "time_s")
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(
                f"{label:52s} {row['peak_mib']:9.1f} {row['time_s']:8.3f} "
                f"{fmt(row['mem_vs_base']):>9s} {fmt(row['time_vs_base']):>9s}"
            )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = {"n": args.n, "v": args.v, "d": args.d, "k": args.k, "dtype": "float32"}
    out.write_text(json.dumps({"shape": shape, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
