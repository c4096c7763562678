"""What a run reports: metrics.jsonl, a progress bar, wandb, and MFU.

Only rank 0 writes. metrics.jsonl holds one JSON object per logged step; on resume the
records past the checkpoint's step are dropped so the file reads like one clean run.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from megapatch.logging_utils import get_logger

log = get_logger("metrics")

# Dense peak FLOP/s by device name: (bf16/fp16 tensor cores, fp32), from vendor datasheets.
# Longer, more specific names first ("H100 PCIe" before "H100").
_PEAKS: dict[str, tuple[float, float]] = {
    "GH200": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM
    "H800": (989e12, 67e12),
    "B200": (2250e12, 80e12),
    "A100": (312e12, 19.5e12),
    "A800": (312e12, 19.5e12),
    "A10G": (125e12, 31.2e12),
    "A10": (125e12, 31.2e12),
    "L40S": (362e12, 91.6e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12),
    "V100": (125e12, 15.7e12),  # fp16 only; no bf16 tensor cores
    "MI300X": (1307e12, 163e12),
}


def peak_flops_per_second(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of one accelerator for `precision`; None on CPU or an unknown device."""
    if not device_name:
        return None
    for name, (half, single) in _PEAKS.items():
        if name.lower() in device_name.lower():
            return single if precision == "fp32" else half
    return None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class MetricsWriter:
    """Appends metrics records to <run_dir>/metrics.jsonl and mirrors them to wandb."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        resume_step: int | None,
        wandb_cfg: dict[str, Any] | None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        if wandb_cfg and wandb_cfg.get("mode", "disabled") != "disabled":
            self.wandb_run = self._start_wandb(Path(run_dir), wandb_cfg)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def _start_wandb(self, run_dir: Path, cfg: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; logging to metrics.jsonl only")
            return None
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=cfg.get("project", "megapatch"),
            name=cfg.get("name"),
            id=run_id,
            resume="allow",
            mode=cfg.get("mode", "offline"),
            dir=str(run_dir),
            config=cfg.get("config"),
        )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            numeric = {
                k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
            }
            self.wandb_run.log(numeric, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class Throughput:
    """Tokens/s over a sliding window of steps, and an ETA for the remaining steps."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0

    def reset(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else 0.0
