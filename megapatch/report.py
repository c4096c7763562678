"""Compare runs from their metrics.jsonl: PNG plots and a Markdown table.

Validation loss is plotted against tokens, estimated training FLOPs and wall time, with
each run's switches (patch → patch, patch → token) marked, because "same quality at half the compute" is a
claim about the x-axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megapatch.errors import MegapatchError
from megapatch.training.metrics import read_metrics

X_AXES = {
    "tokens": ("tokens", "tokens seen"),
    "flops": ("flops", "training FLOPs (estimated)"),
    "wall_time": ("wall_time_s", "wall time (s)"),
}


@dataclass
class RunCurve:
    name: str
    path: Path
    records: list[dict]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("val_loss") is not None]

    @property
    def switches(self) -> list[dict]:
        """The last training record of every phase that a switch ends (patch -> patch,
        patch -> token), in order."""
        steps = [r for r in self.records if r.get("phase") and not r.get("final")]
        return [r for r, after in zip(steps, steps[1:]) if after["phase"] != r["phase"]]

    @property
    def final(self) -> dict | None:
        evals = self.evals
        return evals[-1] if evals else None

    @property
    def is_token_only(self) -> bool:
        return all(r.get("phase") == "token" for r in self.records)


def load_runs(run_dirs: list[str], names: list[str] | None = None) -> list[RunCurve]:
    runs = []
    for i, d in enumerate(run_dirs):
        path = Path(d)
        records = read_metrics(path)
        if not records:
            raise MegapatchError(
                f"{path / 'metrics.jsonl'}: missing or empty; expected a megapatch run directory"
            )
        # Records without a value for the wall-time/flops axes are carried forward from training records.
        last_train = {}
        for r in records:
            if "flops" in r and r.get("flops") is not None:
                last_train = r
            else:
                for key in ("flops", "wall_time_s"):
                    r.setdefault(key, last_train.get(key))
        runs.append(RunCurve(names[i] if names else path.name, path, records))
    return runs


def plot(runs: list[RunCurve], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, (key, label) in X_AXES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for run in runs:
            points = [(r[key], r["val_loss"]) for r in run.evals if r.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=run.name)
            for switch in run.switches:
                if switch.get(key) is not None:
                    ax.axvline(switch[key], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (token level, nats)")
        ax.set_title(f"validation loss vs {label} (dotted: switches)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"val_loss_vs_{axis}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def table(runs: list[RunCurve]) -> str:
    baseline = next((r for r in runs if r.is_token_only), None)
    base_final = baseline.final if baseline else None
    rows = [
        "| run | final val loss | val ppl | tokens | FLOPs | wall time (s) | FLOPs vs token-only | wall time vs token-only |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        final = run.final
        if final is None:
            rows.append(f"| {run.name} | (no evaluation) | | | | | | |")
            continue
        flops, wall = final.get("flops"), final.get("wall_time_s")

        def ratio(value, key):
            if base_final is None or value is None or not base_final.get(key):
                return "-"
            return f"{value / base_final[key]:.3f}"

        loss = final["val_loss"]
        rows.append(
            f"| {run.name} | {loss:.4f} | {math.exp(loss):.2f} | {final.get('tokens', 0):,} | "
            f"{flops:.3g} | {wall:.1f} | {ratio(flops, 'flops')} | {ratio(wall, 'wall_time_s')} |"
            if flops is not None and wall is not None
            else f"| {run.name} | {loss:.4f} | {math.exp(loss):.2f} | {final.get('tokens', 0):,} | - | - | - | - |"
        )
    return "\n".join(rows) + "\n"


def compare(run_dirs: list[str], out_dir: str, names: list[str] | None = None) -> dict:
    runs = load_runs(run_dirs, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, out)
    md = table(runs)
    (out / "table.md").write_text(md)
    return {"plots": [str(p) for p in pngs], "table": md}
