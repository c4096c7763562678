"""`make repro-tiny`: patch-level vs token-level training on the sample corpus, on this CPU.

For each budget B it trains three arms of configs/tiny.yaml:
  token        token-only on B tokens                          (the baseline)
  patch-eqtok  K=4, λ=2/3 on B tokens                          (same data, ~half the compute)
  patch-eqflop K=4, λ=2/3 on 2B tokens                         (same compute as the baseline)
plus a repeat of the token arm at the smallest budget (run-to-run determinism), then
`megapatch compare` per budget and a plot of the patch − token validation-loss gap
against the budget. Everything lands in --out (default runs/repro-tiny).

    python bench/repro_tiny.py --data data/shakespeare [--budgets 393216 786432]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKENS_PER_STEP = 8192  # configs/tiny.yaml


def train(run_dir: Path, data: str, budget: int, extra: list[str]) -> dict:
    cmd = [
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
        *extra,
    ]
    if (run_dir / "summary.json").is_file():
        print(f"  {run_dir.name}: already done, reusing")
    else:
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        print(f"  {run_dir.name}: {time.time() - t0:.0f}s")
    return json.loads((run_dir / "summary.json").read_text())


def arms(budget: int) -> dict[str, tuple[int, list[str]]]:
    # eval.interval keeps ~8 evaluations per run whatever its length
    def every(tokens: int) -> str:
        return f"eval.interval={max(1, tokens // TOKENS_PER_STEP // 8)}"

    return {
        "token": (budget, ["patch.fraction=0", every(budget)]),
        "patch-eqtok": (budget, [every(budget)]),
        "patch-eqflop": (2 * budget, [every(2 * budget)]),
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
        ax.plot(budgets, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(0, color="gray", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("token budget of the token-only baseline")
    ax.set_ylabel("Δ final validation loss (nats); < 0: patch wins")
    ax.set_title("patch-level minus token-level training, tiny model")
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
    parser.add_argument("--budgets", type=int, nargs="+", default=[196_608, 589_824])
    args = parser.parse_args()
    from megapatch.report import compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_note = f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}"
    rows = []
    for budget in args.budgets:
        print(f"budget {budget:,} tokens")
        summaries = {
            name: train(out / f"b{budget}-{name}", args.data, tokens, extra)
            for name, (tokens, extra) in arms(budget).items()
        }
        report = compare(
            [str(out / f"b{budget}-{n}") for n in summaries],
            str(out / f"report-b{budget}"),
            names=list(summaries),
        )
        print(report["table"])
        token = summaries["token"]
        rows.append(
            {
                "budget": budget,
                **{f"val_{n}": s["val_loss"] for n, s in summaries.items()},
                "gap_eqtok": summaries["patch-eqtok"]["val_loss"] - token["val_loss"],
                "gap_eqflop": summaries["patch-eqflop"]["val_loss"] - token["val_loss"],
                "wall_token_s": sum(token["wall_time_s"].values()),
                "wall_eqtok_s": sum(summaries["patch-eqtok"]["wall_time_s"].values()),
                "wall_eqflop_s": sum(summaries["patch-eqflop"]["wall_time_s"].values()),
            }
        )
        rows[-1]["wall_ratio_eqtok"] = rows[-1]["wall_eqtok_s"] / rows[-1]["wall_token_s"]
    repeat = train(
        out / f"b{args.budgets[0]}-token-repeat",
        args.data,
        args.budgets[0],
        arms(args.budgets[0])["token"][1],
    )
    first = json.loads((out / f"b{args.budgets[0]}-token" / "summary.json").read_text())
    determinism = abs(repeat["val_loss"] - first["val_loss"])
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
    print(f"repeat of the token arm at {args.budgets[0]:,}: |Δ val loss| = {determinism:.2e} nats")
    print(f"wrote {out / 'results.json'} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
