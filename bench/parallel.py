"""Parallel layouts of the tiny config on CPU: activation memory per rank with sequence
parallelism on and off, and the forward+backward time of each layout, per phase.

    python bench/parallel.py                 # configs/tiny.yaml's model, micro-batch 16
    python bench/parallel.py --quick         # a smaller model, a smoke run

Activation memory is counted exactly: every tensor autograd saves for the backward of one
forward (torch.autograd.graph.saved_tensors_hooks), each storage once, parameters
excluded. Times are medians of interleaved rounds (layout after layout, round after
round), so the ratios are fair on a shared machine; every layout runs in real gloo
processes. Pipeline parallelism is not in megapatch yet: no bubble is measured here.
Writes bench/results/parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {  # name -> (TP, sequence parallel)
    "TP1": (1, False),
    "TP2": (2, False),
    "TP2+SP": (2, True),
}


def _model_config(quick: bool, sequence_parallel: bool):
    from megapatch.model import GPTConfig

    if quick:
        dims = dict(d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, seq_len=32)
    else:  # configs/tiny.yaml
        dims = dict(d_model=128, n_layers=4, n_heads=4, ffn_hidden=384, seq_len=128)
    return GPTConfig(
        vocab_size=4096, ops_backend="torch", sequence_parallel=sequence_parallel, **dims
    )


def _saved_activation_bytes(model, inputs, targets, k: int) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs, targets, patch_size=k)
    loss.backward()
    model.zero_grad()
    return sum(storages.values())


def _measure(rank, world_size, quick, micro_batch, rounds):
    import torch

    from megapatch.model import GPT
    from megapatch.parallel import destroy_model_parallel, initialize_model_parallel

    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (tp, sp) in LAYOUTS.items():
        if tp != world_size:
            continue
        initialize_model_parallel(tp)
        model = GPT(_model_config(quick, sp), seed=0)
        L = model.cfg.seq_len
        for phase, k in (("patch", 4), ("token", 1)):
            window = torch.randint(0, 4096, (micro_batch, k * L + k), generator=g)
            inputs, targets = window[:, :-k], window[:, k:]
            memory = _saved_activation_bytes(model, inputs, targets, k)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                model(inputs, targets, patch_size=k).backward()
                times.append(time.perf_counter() - t0)
                model.zero_grad()
            out[(name, phase)] = {"activation_bytes": memory, "times": times}
        destroy_model_parallel()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, a smoke run")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel.json"))
    args = parser.parse_args(argv)
    micro = args.micro_batch or (2 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 5)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from tests.distributed import run_distributed

    results = {}
    for world_size in sorted({tp for tp, _ in LAYOUTS.values()}):
        per_rank = run_distributed(_measure, world_size, args.quick, micro, rounds, timeout=1800)
        for key, value in per_rank[0].items():  # every TP rank holds the same shapes
            results[key] = value

    rows = []
    for (name, phase), value in results.items():
        rows.append(
            {
                "layout": name,
                "phase": phase,
                "activation_mib_per_rank": value["activation_bytes"] / 2**20,
                "fwd_bwd_s_median": statistics.median(value["times"]),
            }
        )
    print(f"{'layout':<8} {'phase':<6} {'activations/rank':>17} {'fwd+bwd (median)':>17}")
    for r in rows:
        print(
            f"{r['layout']:<8} {r['phase']:<6} {r['activation_mib_per_rank']:>13.2f} MiB "
            f"{r['fwd_bwd_s_median']:>15.3f} s"
        )
    for phase in ("patch", "token"):
        off = results[("TP2", phase)]["activation_bytes"]
        on = results[("TP2+SP", phase)]["activation_bytes"]
        print(f"{phase}: sequence parallelism keeps {on / off:.1%} of TP2's activations per rank")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "micro_batch": micro,
        "rounds": rounds,
        "model": "quick" if args.quick else "configs/tiny.yaml",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
