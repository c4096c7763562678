"""`make repro-recipes`: patch-training recipes beyond the paper's, at equal compute, on
this CPU (configs/tiny.yaml on the sample corpus).

For each budget B (the token-only baseline's tokens) and seed, six arms with the FLOPs of
token-only training on B tokens:
  token           token-only on B tokens                                  (the baseline)
  paper           K=4, lambda=2/3, tokens per step equal, 2B tokens       (cost 0.5)
  tst             batching=sequences, K=6, r=0.3 of the steps, B budget  (equal FLOPs per step)
  k8-4-1          K=8 for 0.4, K=4 for 0.2, then token; 2B tokens         (cost 0.5)
  paper-noreset   paper without the optimizer reset at the switch
  paper-powerlaw  paper with targets weighted 1, 1/2, 1/3, 1/4
Two arms train at a time, one core each (bench/side_by_side.py, the machinery of
bench/repro_tiny.py). Then `megapatch compare` per budget and seed (loss against tokens,
FLOPs and wall time, every switch marked) and a table of the final token-level
validation loss over the whole validation split. Finished runs are reused.

    python bench/repro_recipes.py --data data/shakespeare [--budgets 196608 393216] [--seeds 1234 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.repro_tiny import TOKENS_PER_STEP, train_side_by_side  # noqa: E402

POWER_LAW = "[1, 0.5, 0.3333333, 0.25]"  # w_k = 1/k, the k-th target of a K=4 patch

# arm -> (tokens as a multiple of B, overrides of configs/tiny.yaml); all cost B token-FLOPs.
ARMS = {
    "token": (1, ["patch.fraction=0"]),
    "paper": (2, []),
    "tst": (1, ["patch.batching=sequences", "patch.size=6", "patch.fraction=0.3"]),
    "k8-4-1": (2, ["patch.stages=[{size: 8, fraction: 0.4}, {size: 4, fraction: 0.2}]"]),
    "paper-noreset": (2, ["patch.reset_optimizer=false"]),
    "paper-powerlaw": (2, [f"patch.position_weights={POWER_LAW}"]),
}


def jobs_for(out: Path, data: str, budget: int, seed: int) -> dict:
    """arm -> (run dir, data, tokens, overrides), as bench/repro_tiny.py trains them."""
    jobs = {}
    for arm, (multiple, overrides) in ARMS.items():
        tokens = multiple * budget
        # ~3 evaluations during training, plus the final one over the whole split
        interval = max(1, tokens // TOKENS_PER_STEP // 3)
        extra = [*overrides, f"run.seed={seed}", f"eval.interval={interval}"]
        jobs[arm] = (out / f"{arm}-b{budget}-seed{seed}", data, tokens, extra)
    return jobs


def stage_shape(run_dir: Path) -> str:
    """Steps and positions (sequences x L) of each phase, from the run's plan."""
    from megapatch.config import load_config
    from megapatch.training.schedule import StagePlan

    plan = StagePlan.from_config(load_config(run_dir / "config.yaml"))
    return ", ".join(
        f"{ph.name} K={ph.patch_size}: {ph.steps} steps x {ph.sequences_per_step * ph.seq_len:,} positions"
        for ph in plan.phases
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "shakespeare"))
    parser.add_argument("--out", default=str(REPO / "runs" / "repro-recipes"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[196_608, 393_216])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1])
    args = parser.parse_args()
    from megapatch.report import compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Earlier invocations' results stay (another budget or seed); this one's replace theirs.
    saved = out / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}
    for budget in args.budgets:
        for seed in args.seeds:
            jobs = jobs_for(out, args.data, budget, seed)
            arms = list(jobs)
            summaries = {}
            for pair in (arms[i : i + 2] for i in range(0, len(arms), 2)):
                print(f"budget {budget:,}, seed {seed}: {' and '.join(pair)} side by side")
                summaries.update(zip(pair, train_side_by_side([jobs[a] for a in pair])))
            report = compare(
                [str(job[0]) for job in jobs.values()],
                str(out / f"report-b{budget}-seed{seed}"),
                names=arms,
            )
            print(report["table"])
            for arm, summary in summaries.items():
                runs = results.setdefault(str(budget), {}).setdefault(arm, [])
                runs[:] = [r for r in runs if r["seed"] != seed]
                runs.append(
                    {
                        "seed": seed,
                        "val_loss": summary["val_loss"],
                        "wall_time_s": sum(summary["wall_time_s"].values()),
                        "flops": summary["flops"],
                        "tokens": sum(summary["tokens"].values()),
                        "shape": stage_shape(jobs[arm][0]),
                    }
                )
    saved.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    rows = [
        "| budget | arm | val loss per seed | mean | Δ vs token | FLOPs vs token | tokens read | train wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for budget, arms in results.items():
        base = statistics.mean(r["val_loss"] for r in arms["token"])
        base_flops = arms["token"][0]["flops"]
        for arm, runs in arms.items():
            mean = statistics.mean(r["val_loss"] for r in runs)
            losses = ", ".join(f"{r['val_loss']:.4f} (seed {r['seed']})" for r in runs)
            wall = statistics.mean(r["wall_time_s"] for r in runs)
            rows.append(
                f"| {int(budget):,} | {arm} | {losses} | {mean:.4f} | {mean - base:+.4f} | "
                f"{runs[0]['flops'] / base_flops:.3f} | {runs[0]['tokens']:,} | {wall:.0f} |"
            )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
