"""The training loop: orchestration only.

Every "is it time?" belongs to the component that owns the rule: the plan (phases, batch
shapes, LR) to `schedule`, data to `run_data`, when and what to evaluate to
`evaluate.Validator`, when to log to `metrics.StepLog`, when to save and what a failed
save means to `checkpoint.policy.SavePolicy`, which checkpoint to continue to
`checkpoint.resume`, the DeepSpeed side to `engine`. This file wires them together and
owns the one thing nobody else can: the switch at every phase boundary (new batch shape
and window, the optimizer reset the plan asks for, K and the target weights).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megapatch import faults, parallel
from megapatch.checkpoint import CheckpointManager, CheckpointWriteError
from megapatch.checkpoint.client_state import ClientState, Progress, run_identity
from megapatch.checkpoint.policy import SavePolicy
from megapatch.checkpoint.resume import resume_point
from megapatch.config import RunConfig, resolve_vocab_size
from megapatch.distributed import DistEnv, all_ranks_agree, init_distributed, rank_failures_reported
from megapatch.errors import MegapatchError
from megapatch.logging_utils import get_logger
from megapatch.training import engine as engine_ops
from megapatch.training.evaluate import Validator
from megapatch.training.metrics import (
    MetricsWriter,
    ProgressReport,
    StepLog,
    data_crc,
    global_data_crc,
    peak_flops_per_second,
    run_summary,
    step_record,
)
from megapatch.training.preemption import PreemptionHandler
from megapatch.training.run_data import (
    open_run_data,
    phase_batches,
    phase_streams,
    validation_windows,
)
from megapatch.training.run_dir import check_run_dir, write_run_files, write_summary
from megapatch.training.schedule import plan_for_world

log = get_logger("train")


@dataclass
class RunResult:
    status: str  # completed | preempted | max_steps | nonfinite
    global_step: int
    run_dir: Path
    summary: dict[str, Any]


class NonFiniteLossError(MegapatchError):
    """Too many consecutive non-finite losses: the run stops with its last good checkpoint."""


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, data: tuple | None = None):
        """`data`: the (train, valid) corpora if already opened (see `open_run_data`)."""
        from megapatch.model import GPTConfig

        self.cfg, self.env = cfg, env
        # Data first: the vocabulary ("auto") comes from the manifest and the plan counts FLOPs with it.
        self.corpus, self.valid_corpus = data or open_run_data(cfg)
        self.vocab_size = resolve_vocab_size(cfg, self.corpus.vocab_size)
        local_devices = torch.cuda.device_count() if torch.cuda.is_available() else None
        self.plan = plan_for_world(
            cfg,
            env.world_size,
            local_world_size=env.local_world_size,
            local_devices=local_devices,
            vocab_size=self.vocab_size,
        )
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        parallel.initialize_model_parallel(tp, pp)
        self.dp_rank = parallel.get_data_parallel_rank()
        self.dp_size = parallel.get_data_parallel_world_size()
        self.is_rank0 = env.rank == 0
        self.pipelined = pp > 1  # a pipeline's middle stages take activations, not data:
        self.reads_data = parallel.is_pipeline_first_stage() or parallel.is_pipeline_last_stage()

        self.run_dir = Path(cfg.run.dir)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last or 0)
        check_run_dir(cfg, self.run_dir, self.ckpt)
        self.ckpt.check_writable()
        self.save_policy = SavePolicy(
            cfg.checkpoint, last_step=self.plan.steps_to_run, checkpoint_dir=self.ckpt.dir
        )
        self.streams = phase_streams(cfg, self.plan, self.corpus)
        self.validator = Validator(
            cfg.eval,
            validation_windows(cfg, self.plan, self.valid_corpus),
            device=env.device,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            dp_group=parallel.get_data_parallel_group(),
        )
        self.model_config = GPTConfig.from_run_config(cfg, self.vocab_size)
        # Which checkpoint to continue from, and whether this run can: known before the
        # (possibly long) model build, so a mismatch fails at once.
        self.identity = run_identity(
            cfg, self.model_config, self.corpus.tokenizer_sha256, dp_size=self.dp_size
        )
        self.resume_from = resume_point(cfg, self.ckpt, self.identity)
        model = engine_ops.build_model(cfg, self.model_config, env.device, dp_size=self.dp_size)
        self.engine = engine_ops.build_engine(
            model,
            cfg,
            self.plan.phases[0],
            dp_size=self.dp_size,
            device=env.device,
            load_universal=bool(self.resume_from and self.resume_from.universal),
        )
        self.native_skip = engine_ops.skips_nonfinite_steps(self.engine)
        self.native_grad_norm = engine_ops.keeps_grad_norm(self.engine)
        self.progress = Progress.start([p.name for p in self.plan.phases])
        self.preemption = PreemptionHandler()
        self.peak = (
            peak_flops_per_second(torch.cuda.get_device_name(env.device), cfg.train.precision)
            if env.device.type == "cuda"
            else None
        )
        self.final_eval: dict | None = None
        self.loader = None

    # -- state ----------------------------------------------------------------------------
    def save(self, reason: str, *, final: bool = False) -> None:
        """Checkpoint now; SavePolicy says what a failure means (stop, or go on)."""
        step = self.progress.global_step
        state = ClientState(self.progress, self.cfg.to_dict(), self.identity)
        try:
            path = self.ckpt.save(self.engine, step, state.to_engine(), rank_state={})
        except CheckpointWriteError as exc:
            self.save_policy.failed(
                exc, step=step, reason=reason, final=final, latest=self.ckpt.latest()
            )
            return
        self.save_policy.saved()
        log.info("checkpoint (%s) at step %d: %s", reason, step, path)

    def maybe_resume(self) -> int | None:
        resume = self.resume_from
        if resume is None:
            return None
        self.ckpt.load(self.engine, resume.checkpoint)
        self.progress = resume.client_state.progress
        log.info("resumed from %s at step %d", resume.checkpoint.path, self.progress.global_step)
        return self.progress.global_step

    # -- phases ---------------------------------------------------------------------------
    def enter_phase(self, index: int, *, switching: bool) -> Any:
        """Shape the engine and data for phase `index`; returns the micro-batch iterator."""
        phase = self.plan.phases[index]
        engine_ops.shape_engine(self.engine, phase, self.dp_size)
        if switching and phase.resets_optimizer:  # the switch policy of the stage before
            cleared = engine_ops.reset_optimizer_state(self.engine)
            log.info("switch to %s phase: optimizer state reset (%d cleared)", phase.name, cleared)
        log.info(
            "%s phase: %d steps, window %d tokens, K=%d, micro-batch %d x accumulation %d x DP %d",
            phase.name,
            phase.steps,
            phase.window,
            phase.patch_size,
            phase.micro_batch_size,
            phase.grad_accum,
            self.dp_size,
        )
        self.close_loader()
        if not self.reads_data:
            return iter(())
        self.loader = phase_batches(
            self.cfg,
            self.streams[phase.name],
            phase,
            consumed_windows=self.progress.consumed_windows[phase.name],
            vocab_size=self.corpus.vocab_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            device=self.env.device,
        )
        return iter(self.loader)

    def close_loader(self) -> None:
        loader, self.loader = self.loader, None
        if loader is not None:
            loader.close()

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, phase, batches) -> tuple[float, bool, float | None]:
        engine, k, weights = self.engine, phase.patch_size, phase.position_weights
        engine_ops.set_lr(engine, self.plan.lr(self.progress.global_step))
        self.step_crc = 0 if faults.record_data_crc() else None
        poison = faults.nan_at(self.progress.global_step)
        if self.pipelined:  # the pipeline engine runs the whole step (engine.py)
            loss, grad_norm = engine_ops.pipeline_train_step(
                engine, batches, phase, self._count, poison
            )
            return loss, not math.isfinite(loss), grad_norm  # the same loss on every rank
        losses = []
        for micro in range(phase.grad_accum):
            batch = self._count(next(batches))
            engine.set_gradient_accumulation_boundary(micro == phase.grad_accum - 1)
            loss = engine(batch[:, :-k], batch[:, k:], patch_size=k, position_weights=weights)
            if poison:
                loss = loss * float("nan")
            losses.append(loss.detach().float())
            engine.backward(loss)
            if micro < phase.grad_accum - 1:
                engine.step()
        mean_loss = torch.stack(losses).mean()
        bad = all_ranks_agree(not bool(torch.isfinite(mean_loss)), self.env.device)
        grad_norm = None if self.native_grad_norm else engine_ops.grad_norm_before_step(engine)
        if bad and not self.native_skip:
            engine.zero_grad()  # plain fp32 optimizers would apply NaN; skip the update ourselves
        else:
            engine.step()  # ZeRO / bf16 skip a non-finite step themselves
        if self.native_grad_norm:
            grad_norm = engine.get_global_grad_norm()
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(mean_loss, group=parallel.get_data_parallel_group())
            mean_loss /= self.dp_size
        return float(mean_loss), bad, (float(grad_norm) if grad_norm is not None else None)

    def _count(self, batch):
        if self.step_crc is not None:
            self.step_crc += data_crc(batch)
        return batch

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        # A collective that fails (another rank died or hung) ends the run with one clear line.
        with rank_failures_reported(self._where):
            return self._run()

    def _where(self) -> str:
        latest = self.ckpt.latest()
        return (
            f"after step {self.progress.global_step}; the last complete checkpoint is "
            f"{latest.path if latest else 'none'}: restart the job with train.resume=auto"
        )

    def _run(self) -> RunResult:
        cfg = self.cfg
        resumed_at = self.maybe_resume()
        if self.is_rank0:
            write_run_files(cfg, self.run_dir, self.plan, self.corpus.tokenizer_path)
        writer = MetricsWriter(
            self.run_dir,
            enabled=self.is_rank0,
            resume_step=resumed_at,
            wandb_cfg={
                "mode": cfg.logging.wandb_mode,
                "project": cfg.logging.wandb_project,
                "name": cfg.run.name,
                "config": cfg.to_dict(),
            },
        )
        progress = ProgressReport(
            enabled=self.is_rank0 and cfg.logging.progress,
            total=self.plan.steps_to_run,
            initial=self.progress.global_step,
            interval=cfg.logging.interval,
        )
        self.step_log = StepLog(writer, progress, cfg.logging.interval)
        self.preemption.install()
        try:
            status = self._loop()
        finally:
            self.close_loader()
            self.preemption.restore()
            self.step_log.close()
        summary = run_summary(
            self.progress, self.plan, status, self.final_eval, self.save_policy.failed_saves
        )
        if self.is_rank0:
            write_summary(self.run_dir, summary)
        return RunResult(status, self.progress.global_step, self.run_dir, summary)

    def _loop(self) -> str:
        cfg, p = self.cfg, self.progress
        max_steps = cfg.train.max_steps
        previous_phase = None
        while p.phase_index < len(self.plan.phases):
            phase = self.plan.phases[p.phase_index]
            if p.step_in_phase >= phase.steps:  # resumed exactly at the end of a phase
                p.phase_index, p.step_in_phase = p.phase_index + 1, 0
                previous_phase = phase
                continue
            switching = previous_phase is not None and p.step_in_phase == 0  # every boundary
            batches = self.enter_phase(p.phase_index, switching=switching)
            while p.step_in_phase < phase.steps:
                if max_steps is not None and p.global_step >= max_steps:
                    self.save("max_steps", final=True)
                    return "max_steps"
                t0 = time.perf_counter()
                loss, bad, grad_norm = self.train_step(phase, batches)
                dt = time.perf_counter() - t0
                self._advance(phase, dt, bad)
                record = step_record(
                    p,
                    self.plan,
                    phase,
                    loss=loss,
                    grad_norm=grad_norm,
                    dt=dt,
                    data_crc=global_data_crc(self.step_crc, self.env.device),
                    peak_flops=self.peak,
                    world_size=self.env.world_size,
                )
                at_phase_end = p.step_in_phase == phase.steps
                if self.validator.due(p.global_step):
                    record.update(self.validator.run(self.engine, phase))
                self.step_log.step(record, at_phase_end=at_phase_end)
                if p.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    self._stop_for_nonfinite()
                if all_ranks_agree(self.preemption.requested, self.env.device):
                    self.save("preemption", final=True)
                    return "preempted"
                reason = self.save_policy.due(
                    p.global_step,
                    phase_name=phase.name,
                    at_phase_end=at_phase_end,
                    nonfinite_streak=p.nonfinite_streak,
                )
                if reason:
                    self.save(reason)
                faults.maybe_kill_after_step(p.global_step)
                faults.maybe_hang_after_step(p.global_step)
            previous_phase = phase
            p.phase_index, p.step_in_phase = p.phase_index + 1, 0
        last = self.plan.phases[-1]
        if self.validator.at_end:
            final = {"step": p.global_step, "phase": last.name, "tokens": sum(p.tokens.values())}
            final.update(self.validator.run(self.engine, last))
            final["final"] = True
            self.step_log.writer.write(final)
            self.final_eval = final
        self.save("end", final=True)
        return "completed"

    def _advance(self, phase, dt: float, bad: bool) -> None:
        """Count the step just taken in the run's progress."""
        p = self.progress
        p.global_step += 1
        p.step_in_phase += 1
        p.consumed_windows[phase.name] += phase.sequences_per_step
        p.tokens[phase.name] += phase.tokens_per_step
        p.wall_time[phase.name] += dt
        if bad:
            p.nonfinite_total += 1
            p.nonfinite_streak += 1
            log.warning(
                "step %d: non-finite loss, update skipped (%d in a row)",
                p.global_step,
                p.nonfinite_streak,
            )
        else:
            p.nonfinite_streak = 0

    def _stop_for_nonfinite(self) -> None:
        p = self.progress
        latest = self.ckpt.latest()
        raise NonFiniteLossError(
            f"{p.nonfinite_streak} non-finite losses in a row at step {p.global_step} "
            f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); the last good checkpoint "
            f"is {latest.path if latest else 'none'}: lower train.lr or check the data, then resume"
        )


def train(cfg: RunConfig) -> RunResult:
    """Run (or resume) training for `cfg` in this process; every rank calls this."""
    data = open_run_data(cfg)  # bad data fails here, before any process group exists
    env = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    torch.manual_seed(cfg.run.seed)
    try:
        with rank_failures_reported(lambda: "while the run was starting"):
            trainer = Trainer(cfg, env, data)
        return trainer.run()
    finally:
        # Tear down collectives before interpreter exit: a live gloo group aborts the process.
        parallel.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["train", "Trainer", "RunResult", "NonFiniteLossError"]
