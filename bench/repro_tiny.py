"""`make repro-tiny`: patch-level vs token-level training on the sample corpus, on this CPU.

For each budget B it compares three arms of configs/tiny.yaml (the first two train at
the same time, one core each, so machine load hits both alike and their wall-time ratio
is fair):
  token        token-only on B tokens                          (the baseline)
  patch-eqtok  K=4, λ=2/3 on B tokens                          (same data, ~half the compute)
  patch-eqflop K=4, λ=2/3 on 2B tokens                         (same compute as the baseline)
plus a repeat of the token arm at the smallest budget (run-to-run determinism), then
`megapatch compare` per budget and a plot of the patch − token validation-loss gap
against the budget. Runs are named by what they train (token-T, patch-T), so the
same-compute arm of B and the same-tokens arm of 2B are one run. Everything lands in
--out (default runs/repro-tiny); finished runs are reused.

    python bench/repro_tiny.py --data data/shakespeare [--budgets 196608 393216]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.side_by_side import run_side_by_side  # noqa: E402

TOKENS_PER_STEP = 8192  # configs/tiny.yaml


def train_command(run_dir: Path, data: str, budget: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megapatch",
        "train",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.total_tokens={budget}",
        "logging.wandb_mode=disabled",
        "logging.progress=false",
        "checkpoint.interval=0",
        "checkpoint.at_switch=false",
        "train.resume=auto",
        # Warmup in proportion to each phase (configs/tiny.yaml's 8 steps would be the whole
        # patch phase at the smallest budget and a quarter of a 32-step token phase): no
        # arm's phase is shorter than its warmup and none gets a larger share of it.
        "train.warmup_steps=10%",
        "eval.max_windows=null",  # the final validation loss is over the whole split
        *extra,
    ]


def train_side_by_side(jobs: list[tuple[Path, str, int, list[str]]]) -> list[dict]:
    """Train runs at the same time, one core each (bench/side_by_side.py): their wall-time
    ratio is then fair on a busy machine. Finished runs are reused (the others then train
    without a partner)."""
    todo = []
    for run_dir, data, budget, extra in jobs:
        if (run_dir / "summary.json").is_file():
            print(f"  {run_dir.name}: already done, reusing")
        else:
            todo.append((run_dir, train_command(run_dir, data, budget, extra)))
    if todo:
        run_side_by_side([cmd for _, cmd in todo], cwd=REPO)
    for run_dir, _ in todo:
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"  {run_dir.name}: {sum(summary['wall_time_s'].values()):.0f}s of training steps")
    return [json.loads((job[0] / "summary.json").read_text()) for job in jobs]


def train(run_dir: Path, data: str, budget: int, extra: list[str]) -> dict:
    return train_side_by_side([(run_dir, data, budget, extra)])[0]


def run_name_and_overrides(
    kind: str, tokens: int, seed: int | None = None
) -> tuple[str, list[str]]:
    """A run is fixed by its kind, token count and seed (None: the config's);
    eval.interval keeps ~8 evaluations."""
    overrides = ["patch.fraction=0"] if kind == "token" else []
    overrides.append(f"eval.interval={max(1, tokens // TOKENS_PER_STEP // 8)}")
    name = f"{kind}-{tokens}"
    if seed is not None:
        name += f"-seed{seed}"
        overrides.append(f"run.seed={seed}")
    return name, overrides


def arm_jobs(out: Path, data: str, budget: int, seed: int | None = None) -> dict:
    """arm -> (run dir, data, tokens, overrides) for one budget."""
    jobs = {}
    for arm, (kind, tokens) in arms(budget).items():
        name, extra = run_name_and_overrides(kind, tokens, seed)
        jobs[arm] = (out / name, data, tokens, extra)
    return jobs


SIDE_BY_SIDE = ("token", "patch-eqtok")  # same tokens: their wall-time ratio is a result


def train_arms(out: Path, data: str, budget: int, seed: int | None = None):
    """The three arms of one budget: (run dirs, summaries), both keyed by arm."""
    jobs = arm_jobs(out, data, budget, seed)
    summaries = dict(zip(SIDE_BY_SIDE, train_side_by_side([jobs[a] for a in SIDE_BY_SIDE])))
    summaries["patch-eqflop"] = train(*jobs["patch-eqflop"])
    return {arm: job[0] for arm, job in jobs.items()}, summaries


def gaps(summaries: dict) -> dict[str, float]:
    token = summaries["token"]["val_loss"]
    return {
        "gap_eqtok": summaries["patch-eqtok"]["val_loss"] - token,
        "gap_eqflop": summaries["patch-eqflop"]["val_loss"] - token,
    }


def arms(budget: int) -> dict[str, tuple[str, int]]:
    """arm -> (run kind, tokens)."""
    return {
        "token": ("token", budget),
        "patch-eqtok": ("patch", budget),
        "patch-eqflop": ("patch", 2 * budget),
    }


def gap_plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    budgets = [r["budget"] for r in rows]
    for key, label in (
        ("gap_eqtok", "patch (same tokens, ~½ compute) − token"),
        ("gap_eqflop", "patch (same compute, 2× tokens) − token"),
    ):
        (line,) = ax.plot(budgets, [r[key] for r in rows], marker="o", label=label)
        spread = [r for r in rows if f"{key}_range" in r]
        if spread:  # the range over seeds where it was measured
            lo = [r[key] - r[f"{key}_range"][0] for r in spread]
            hi = [r[f"{key}_range"][1] - r[key] for r in spread]
            ax.errorbar(
                [r["budget"] for r in spread],
                [r[key] for r in spread],
                yerr=[lo, hi],
                fmt="none",
                ecolor=line.get_color(),
                capsize=4,
            )
    ax.axhline(0, color="gray", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("token budget of the token-only baseline")
    ax.set_ylabel("Δ final validation loss (nats); < 0: patch wins")
    ax.set_title("patch − token training, tiny model (bars: range over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gap_vs_budget.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "shakespeare"))
    parser.add_argument("--out", default=str(REPO / "runs" / "repro-tiny"))
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[98_304, 196_608, 393_216, 786_432]
    )
    parser.add_argument(
        "--spread-seeds",
        type=int,
        nargs="*",
        default=[1, 2],
        help="other seeds for the arms of the smallest budgets (seed noise of the gaps)",
    )
    parser.add_argument(
        "--spread-budgets", type=int, default=2, help="how many of the smallest budgets"
    )
    args = parser.parse_args()
    from megapatch.report import compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_note = f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}"
    # First every same-tokens pair side by side: a budget's same-compute run is the next
    # budget's same-tokens patch run, which must not train alone first.
    for budget in args.budgets:
        print(f"budget {budget:,} tokens: token and patch arms side by side")
        jobs = arm_jobs(out, args.data, budget)
        train_side_by_side([jobs[a] for a in SIDE_BY_SIDE])
    rows = []
    for budget in args.budgets:
        print(f"budget {budget:,} tokens")
        run_dirs, summaries = train_arms(out, args.data, budget)
        report = compare(
            [str(d) for d in run_dirs.values()],
            str(out / f"report-b{budget}"),
            names=list(run_dirs),
        )
        print(report["table"])
        token = summaries["token"]
        rows.append(
            {
                "budget": budget,
                **{f"val_{n}": s["val_loss"] for n, s in summaries.items()},
                **gaps(summaries),
                "wall_token_s": sum(token["wall_time_s"].values()),
                "wall_eqtok_s": sum(summaries["patch-eqtok"]["wall_time_s"].values()),
                "wall_eqflop_s": sum(summaries["patch-eqflop"]["wall_time_s"].values()),
            }
        )
        rows[-1]["wall_ratio_eqtok"] = rows[-1]["wall_eqtok_s"] / rows[-1]["wall_token_s"]
    name, extra = run_name_and_overrides("token", args.budgets[0])
    repeat = train(out / f"{name}-repeat", args.data, args.budgets[0], extra)
    first = json.loads((out / name / "summary.json").read_text())
    determinism = abs(repeat["val_loss"] - first["val_loss"])
    # Seed noise: the gaps of the smallest budgets again with other seeds (init and data order)
    for row in rows[: args.spread_budgets]:
        print(f"seed spread at {row['budget']:,} tokens")
        per_seed = [{k: row[k] for k in ("gap_eqtok", "gap_eqflop")}]
        for seed in args.spread_seeds:
            per_seed.append(gaps(train_arms(out, args.data, row["budget"], seed)[1]))
        for key in ("gap_eqtok", "gap_eqflop"):
            values = [g[key] for g in per_seed]
            row[f"{key}_seeds"] = values
            row[f"{key}_range"] = [min(values), max(values)]
    plot = gap_plot(rows, out)
    result = {
        "rows": rows,
        "repeat_abs_diff_nats": determinism,
        "gap_plot": str(plot),
        "env": env_note,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    print(
        "| budget | token val | patch same-tokens | patch same-compute | Δ same-tokens | Δ same-compute | wall patch/token (same tokens) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['budget']:,} | {r['val_token']:.4f} | {r['val_patch-eqtok']:.4f} | {r['val_patch-eqflop']:.4f} | "
            f"{r['gap_eqtok']:+.4f} | {r['gap_eqflop']:+.4f} | {r['wall_ratio_eqtok']:.3f} |"
        )
    for r in rows:
        if "gap_eqtok_seeds" in r:
            print(
                f"seeds at {r['budget']:,}: Δ same-tokens "
                + " ".join(f"{g:+.4f}" for g in r["gap_eqtok_seeds"])
                + "; Δ same-compute "
                + " ".join(f"{g:+.4f}" for g in r["gap_eqflop_seeds"])
            )
    print(f"repeat of the token arm at {args.budgets[0]:,}: |Δ val loss| = {determinism:.2e} nats")
    print(f"wrote {out / 'results.json'} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
