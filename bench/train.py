"""Training throughput per phase, side by side, and a whole patch run against token-only.

Part 1 builds one real DeepSpeed engine (the `megapatch train` code path) and alternates
optimizer steps of the patch phase and the token phase — same model, same tokens per
step — so the machine's noise hits both alike. Target: patch tokens/s ≥ 0.9·K × token.

Part 2 (`--full`) trains the config twice through `megapatch train` (K=4, λ=2/3, and
token-only on the same budget), side by side on one core each, and compares the training
wall time. Target: ≤ 0.55×.

    python bench/train.py --data data/shakespeare [--steps 8] [--full] [--config configs/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.side_by_side import run_side_by_side  # noqa: E402


def interleaved_phase_throughput(
    config: str, data: str, steps: int, overrides: list[str], profile: Path | None = None
) -> dict:
    import torch

    from megapatch.config import load_config
    from megapatch.distributed import init_distributed
    from megapatch.training.engine import shape_engine
    from megapatch.training.run_data import phase_batches
    from megapatch.training.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench-train-")
    cfg = load_config(
        config,
        [
            f"data.path={data}",
            f"run.dir={run_dir}",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
            "train.resume=none",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, init_distributed(timeout_s=cfg.train.collective_timeout_s))
    patch, token = trainer.plan.phases

    def open_batches(phase):  # both phases' loaders open at once (the trainer keeps one)
        return phase_batches(
            cfg,
            trainer.streams[phase.name],
            phase,
            consumed_windows=0,
            vocab_size=trainer.corpus.vocab_size,
            dp_rank=trainer.dp_rank,
            dp_size=trainer.dp_size,
            device=trainer.env.device,
        )

    loaders = {p.name: open_batches(p) for p in (patch, token)}
    batches = {name: iter(loader) for name, loader in loaders.items()}
    times: dict[str, list[float]] = {"patch": [], "token": []}
    for i in range(steps + 1):  # the first round warms up allocators and kernels
        for phase in (patch, token) if i % 2 == 0 else (token, patch):
            shape_engine(trainer.engine, phase, trainer.dp_size)
            t0 = time.perf_counter()
            trainer.train_step(phase, batches[phase.name])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i > 0:
                times[phase.name].append(time.perf_counter() - t0)
    profiles = {}
    if profile is not None:  # one more step of each phase under the profiler
        profiles = {
            p.name: _profile_step(trainer, p, batches[p.name], profile) for p in (patch, token)
        }
    for loader in loaders.values():
        loader.close()
    import torch.distributed as dist

    dist.destroy_process_group()  # a live gloo group aborts the interpreter at exit
    rows = {}
    for phase in (patch, token):
        median = statistics.median(times[phase.name])
        rows[phase.name] = {
            "K": phase.patch_size,
            "window": phase.window,
            "sequences_per_step": phase.sequences_per_step,
            "micro_batch_x_accum": f"{phase.micro_batch_size}x{phase.grad_accum}",
            "tokens_per_step": phase.tokens_per_step,
            "median_step_s": median,
            "tokens_per_s": phase.tokens_per_step / median,
            # model FLOPs the step does (a patch step's are ~1/K of a token step's per token)
            "model_tflops_per_s": phase.flops_per_step / median / 1e12,
            "mfu": phase.flops_per_step / median / trainer.peak if trainer.peak else None,
        }
    ratio = rows["patch"]["tokens_per_s"] / rows["token"]["tokens_per_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "precision": cfg.train.precision,
        "ops_backend": cfg.train.ops_backend,
        "triton_loss_mode": _triton_loss_mode(),
        "parameters": sum(p.numel() for p in trainer.engine.module.parameters()),
        "phases": rows,
        "profiles": profiles,
        "patch_over_token": ratio,
        "target": 0.9 * patch.patch_size,
        "steps_timed": steps,
        "torch_threads": torch.get_num_threads(),
    }


def _triton_loss_mode() -> str | None:
    """The Triton loss's mode this process runs (MEGAPATCH_LOSS_BACKWARD or the default)."""
    try:
        from megapatch.ops import triton_ops
    except ImportError:  # no triton here
        return None
    return triton_ops.BACKWARD


def _profile_step(trainer, phase, batches, out_dir: Path) -> dict:
    """Profile one optimizer step; write the op table (by self time) and return its path
    and its top lines (kept in the JSON, so one run's file holds the reading)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        activities.append(ProfilerActivity.CUDA)
    from megapatch.training.engine import shape_engine

    shape_engine(trainer.engine, phase, trainer.dp_size)
    with profile(activities=activities) as prof:
        trainer.train_step(phase, batches)
        if on_cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile_{phase.name}.txt"
    path.write_text(table + "\n")
    top = table.splitlines()[:20]
    print(f"\n{phase.name} step, top ops by self {'GPU' if on_cuda else 'CPU'} time:")
    print("\n".join(top))
    return {"table": str(path), "sort": sort, "top": top}


def full_runs(config: str, data: str, overrides: list[str]) -> dict:
    """Both arms end to end through `megapatch train`, side by side (one core each)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-full-") as tmp:
        arms = {"patch": [], "token": ["patch.fraction=0"]}
        commands = [
            [
                sys.executable, "-m", "megapatch", "train", config, f"data.path={data}",
                f"run.dir={Path(tmp) / arm}", "logging.wandb_mode=disabled",
                "logging.progress=false", "eval.interval=0", "eval.at_end=false",
                "checkpoint.interval=0", "checkpoint.at_switch=false", *overrides, *extra,
            ]
            for arm, extra in arms.items()
        ]  # fmt: skip
        # a fresh world of one each: drop the rendezvous variables part 1 set in this process
        rendezvous = (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
        env = {k: v for k, v in os.environ.items() if k not in rendezvous}
        run_side_by_side(commands, cwd=REPO, env=env)
        for arm in arms:
            summary = json.loads((Path(tmp) / arm / "summary.json").read_text())
            results[arm] = {
                "wall_time_s": sum(summary["wall_time_s"].values()),
                "tokens": sum(summary["tokens"].values()),
                "planned_cost_ratio": summary["planned_cost_ratio"],
            }
    results["wall_time_ratio"] = results["patch"]["wall_time_s"] / results["token"]["wall_time_s"]
    results["target"] = 0.55
    results["side_by_side"] = True
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--data", default=str(REPO / "data" / "shakespeare"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per phase")
    parser.add_argument("--full", action="store_true", help="also train both arms end to end")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    parser.add_argument(
        "--profile", type=Path, help="also profile one step of each phase; op tables to this folder"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for both parts")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    if not (Path(args.data) / "manifest.json").is_file():
        print(
            f"bench/train.py: {args.data} is not a prep output; run `megapatch prep --sample shakespeare --out {args.data}`"
        )
        return 2

    result = {"config": args.config, "overrides": args.overrides}
    result["interleaved"] = inter = interleaved_phase_throughput(
        args.config, args.data, args.steps, args.overrides, args.profile
    )
    print(
        f"{inter['device']}, {inter['precision']}, ops {inter['ops_backend']}, {inter['parameters'] / 1e6:.1f}M parameters"
    )
    print(
        f"{'phase':<6} {'K':>2} {'window':>7} {'seq/step':>8} {'mb x acc':>9} {'step (s)':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}"
    )
    for name, row in inter["phases"].items():
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(
            f"{name:<6} {row['K']:>2} {row['window']:>7} {row['sequences_per_step']:>8} {row['micro_batch_x_accum']:>9} "
            f"{row['median_step_s']:>9.3f} {row['tokens_per_s']:>10,.0f} {row['model_tflops_per_s']:>8.2f} {mfu:>6}"
        )
    print(
        f"patch/token tokens/s: {inter['patch_over_token']:.2f}x (target >= {inter['target']:.1f}x)"
    )
    if args.full:
        result["full"] = full = full_runs(args.config, args.data, args.overrides)
        print(
            f"full run wall time: patch arm {full['patch']['wall_time_s']:.1f}s, token-only {full['token']['wall_time_s']:.1f}s "
            f"-> {full['wall_time_ratio']:.3f}x (planned FLOPs {full['patch']['planned_cost_ratio']:.3f}x, target <= 0.55x)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
