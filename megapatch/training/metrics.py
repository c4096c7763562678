"""What a run reports: metrics.jsonl, progress on the terminal or in the log, wandb, MFU,
and the end-of-run summary.

Only rank 0 writes. metrics.jsonl holds one JSON object per logged step; on resume the
records past the checkpoint's step are dropped so the file reads like one clean run.
A step is logged every `logging.interval` steps, at every evaluation and at the end of
each phase (`StepLog`). wandb's own console output goes to the run's log file, not to
the terminal.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
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
        log_file: str = "train.log",
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_file = Path(run_dir) / log_file
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
        with self._wandb_output():
            return wandb.init(
                project=cfg.get("project", "megapatch"),
                name=cfg.get("name"),
                id=run_id,
                resume="allow",
                mode=cfg.get("mode", "offline"),
                dir=str(run_dir),
                config=cfg.get("config"),
            )

    @contextlib.contextmanager
    def _wandb_output(self):
        """wandb's banner and its ~30-line run summary go to the run's log file: the
        terminal keeps megapatch's own summary as the last thing printed."""
        with open(self.log_file, "a") as f, contextlib.redirect_stdout(f):
            with contextlib.redirect_stderr(f):
                yield

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
            with self._wandb_output():
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class ProgressReport:
    """Rank 0's progress: a tqdm bar on a terminal; off one (SLURM logs, CI, nohup), where
    a bar's carriage returns make one multi-megabyte line, a plain log line every
    `interval` steps with the same fields and an ETA."""

    def __init__(self, *, enabled: bool, total: int, initial: int, interval: int, stream=None):
        self.total, self.interval = total, interval
        self.enabled = enabled
        self.bar = None
        self.t0, self.first = time.perf_counter(), initial
        stream = stream or sys.stderr
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=stream
            )

    def update(self, step: int, phase: str, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        fields = f"{phase} loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(fields)
        elif step % self.interval == 0 or step == self.total:
            done = step - self.first
            per_step = (time.perf_counter() - self.t0) / done if done else 0.0
            eta = _duration(per_step * (self.total - step))
            log.info("step %d/%d %s, ETA %s", step, self.total, fields, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepLog:
    """Decides which steps are written (every `logging.interval` steps, every evaluation,
    every phase end; the last step before each switch carries `"switch": true`) and shows
    progress."""

    def __init__(self, writer: MetricsWriter, progress: ProgressReport, interval: int):
        self.writer, self.progress, self.interval = writer, progress, interval

    def step(self, record: dict[str, Any], *, at_phase_end: bool) -> None:
        step = record["step"]
        if at_phase_end and record["phase"] != "token":  # only patch stages end in a switch
            record["switch"] = True
        if step % self.interval == 0 or "val_loss" in record or at_phase_end:
            self.writer.write(record)
        self.progress.update(
            step, record["phase"], record["loss"], record["lr"], record["tokens_per_s"]
        )

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def run_summary(progress, plan, status: str, final_eval: dict | None, failed_saves: int) -> dict:
    """summary.json: the run's status, tokens, time and speed per phase, and its cost."""
    p = progress
    tokens_per_s = {
        name: (p.tokens[name] / p.wall_time[name] if p.wall_time.get(name) else None)
        for name in p.tokens
    }
    summary: dict[str, Any] = {
        "status": status,
        "global_step": p.global_step,
        "tokens": dict(p.tokens),
        "wall_time_s": dict(p.wall_time),
        "tokens_per_s": tokens_per_s,
        "nonfinite_steps": p.nonfinite_total,
        "failed_saves": failed_saves,
        "planned_cost_ratio": plan.cost_ratio,
        "flops": plan.flops_so_far(p.global_step),
    }
    if final_eval:
        summary["val_loss"] = final_eval.get("val_loss")
        summary["val_ppl"] = final_eval.get("val_ppl")
    token_rate = tokens_per_s.get("token")
    if status == "completed" and token_rate:
        # Wall time of this run against a token-only run of the same budget at the measured token-phase speed.
        token_only = sum(p.tokens.values()) / token_rate
        summary["measured_cost_ratio"] = sum(p.wall_time.values()) / token_only
    return summary


def data_crc(batch) -> int:
    """A checksum of a micro-batch's windows: the sum of each window's CRC-32, so that of a
    global batch (summed over the DP ranks, `global_data_crc`) does not depend on the split."""
    import zlib

    return sum(zlib.crc32(row.tobytes()) for row in batch.cpu().numpy())


def global_data_crc(local: int | None, device) -> int | None:
    """`local` (this rank's `data_crc` sum; None: not recorded) summed over the DP ranks,
    so it is the global batch's whatever the DP size. Every rank calls it."""
    import torch
    import torch.distributed as dist

    from megapatch import parallel

    if local is None or not dist.is_initialized() or parallel.get_data_parallel_world_size() == 1:
        return local
    total = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=parallel.get_data_parallel_group())
    return int(total.item())


def step_record(
    progress,
    plan,
    phase,
    *,
    loss: float,
    grad_norm: float | None,
    dt: float,
    data_crc: int | None,
    peak_flops: float | None,
    world_size: int,
) -> dict[str, Any]:
    """The metrics record of the optimizer step just finished."""
    p = progress
    record: dict[str, Any] = {
        "step": p.global_step,
        "phase": phase.name,
        "patch_size": phase.patch_size,
        "tokens": sum(p.tokens.values()),
        "loss": loss,
        "lr": plan.lr(p.global_step - 1),
        "grad_norm": grad_norm,
        "tokens_per_s": phase.tokens_per_step / dt if dt > 0 else 0.0,
        "step_time_s": dt,
        "flops": plan.flops_so_far(p.global_step),
        "wall_time_s": sum(p.wall_time.values()),
        "nonfinite_total": p.nonfinite_total,
    }
    if data_crc is not None:
        record["data_crc"] = data_crc
    if peak_flops:
        record["mfu"] = phase.flops_per_step / dt / (peak_flops * world_size)
    return record
