"""The training loop: orchestration only.

Each concern lives elsewhere — the plan in `schedule`, data in `data`, the model in
`model`, DeepSpeed settings in `optimizer`, saving in `checkpoint`, reporting in
`metrics`. This file wires them together and owns the one thing nobody else can: the
patch → token switch (new batch shape and window, optimizer reset, K=1).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megapatch import faults, parallel
from megapatch.checkpoint import CheckpointManager, CheckpointWriteError
from megapatch.config import RunConfig, resolve_vocab_size, validate_for_world
from megapatch.distributed import DistEnv, all_ranks_agree, init_distributed, rank_failures_reported
from megapatch.errors import MegapatchError
from megapatch.evaluate import perplexity, windowed_loss
from megapatch.logging_utils import get_logger
from megapatch.metrics import MetricsWriter, Throughput, peak_flops_per_second
from megapatch.optimizer import (
    deepspeed_config,
    param_groups,
    reset_optimizer_state,
    set_lr,
    skips_nonfinite_steps,
)
from megapatch.preemption import PreemptionHandler
from megapatch.resume import check_resumable, check_run_dir, checkpoint_to_resume, read_client_state
from megapatch.run_data import (
    VocabCheckedSampler,
    open_run_data,
    phase_streams,
    validation_windows,
)

log = get_logger("train")


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint (client state)."""

    global_step: int = 0
    phase_index: int = 0
    step_in_phase: int = 0
    consumed_windows: dict[str, int] = field(default_factory=dict)  # per phase, global count
    tokens: dict[str, int] = field(default_factory=dict)  # per phase
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    wall_time: dict[str, float] = field(default_factory=dict)  # per phase, seconds of training

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Progress:
        return cls(**state)


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
        from megapatch.model import GPT, GPTConfig

        self.cfg, self.env = cfg, env
        tp = cfg.parallel.tensor_model_parallel_size
        # Data first: the vocabulary ("auto") comes from the manifest and the plan counts FLOPs with it.
        self.corpus, self.valid_corpus = data or open_run_data(cfg)
        self.vocab_size = resolve_vocab_size(cfg, self.corpus.vocab_size)
        local_devices = torch.cuda.device_count() if torch.cuda.is_available() else None
        self.plan = validate_for_world(
            cfg,
            env.world_size,
            local_world_size=env.local_world_size,
            local_devices=local_devices,
            vocab_size=self.vocab_size,
        )
        parallel.initialize_model_parallel(tp)
        self.dp_rank = parallel.get_data_parallel_rank()
        self.dp_size = parallel.get_data_parallel_world_size()
        self.is_rank0 = env.rank == 0

        self.run_dir = Path(cfg.run.dir)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last or 0)
        check_run_dir(cfg, self.run_dir, self.ckpt)
        self.ckpt.check_writable()
        self.failed_saves = 0  # in this process, for summary.json
        self.failed_saves_in_a_row = 0  # against checkpoint.max_failed_saves

        self.streams = phase_streams(cfg, self.plan, self.corpus)
        self.valid_windows = validation_windows(cfg, self.plan, self.valid_corpus)

        m = cfg.model
        self.model_config = GPTConfig(
            vocab_size=self.vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads,
            ffn_hidden=m.ffn_hidden,
            seq_len=m.seq_len,
            rope_theta=m.rope_theta,
            norm_eps=m.norm_eps,
            tie_embeddings=m.tie_embeddings,
            init_std=m.init_std,
            activation_checkpointing=m.activation_checkpointing,
            make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
            ops_backend=cfg.train.ops_backend,
        )
        # Which checkpoint to continue from, and whether this run can: known before the
        # (possibly long) model build, so a mismatch fails at once.
        self.resume_from = checkpoint_to_resume(cfg, self.ckpt)
        if self.resume_from is not None:
            saved = read_client_state(self.resume_from.path)
            check_resumable(self.resume_from.path, saved, self._identity())
        model = GPT(self.model_config, seed=cfg.run.seed).to(env.device)
        if cfg.init.from_hf:
            from megapatch.hf import load_hf_into_model

            load_hf_into_model(model, cfg.init.from_hf)
        if cfg.train.compile:
            model.compile_blocks()

        first = self.plan.phases[0]
        t = cfg.train
        self.ds_config = deepspeed_config(
            micro_batch_size=first.micro_batch_size,
            grad_accum=first.grad_accum,
            dp_size=self.dp_size,
            zero_stage=cfg.parallel.zero_stage,
            precision=t.precision,
            grad_clip=t.grad_clip,
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
            weight_decay=t.weight_decay,
            on_cuda=env.device.type == "cuda",
            overrides=cfg.parallel.deepspeed,
        )
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, t.weight_decay),
            config=self.ds_config,
            mpu=parallel.mpu,
        )
        self.native_skip = skips_nonfinite_steps(self.engine)
        self.progress = Progress(
            consumed_windows={p.name: 0 for p in self.plan.phases},
            tokens={p.name: 0 for p in self.plan.phases},
            wall_time={p.name: 0.0 for p in self.plan.phases},
        )
        self.preemption = PreemptionHandler()
        self.metrics: MetricsWriter | None = None
        self.peak = (
            peak_flops_per_second(torch.cuda.get_device_name(env.device), cfg.train.precision)
            if env.device.type == "cuda"
            else None
        )

    # -- state ----------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it (the model, the
        data's tokenizer, the config identity, the parallel layout)."""
        return {
            "config_hash": self.cfg.config_hash(),
            "model_config": dataclasses.asdict(self.model_config),
            "tokenizer_sha256": self.corpus.tokenizer_sha256,
            "tensor_model_parallel_size": self.cfg.parallel.tensor_model_parallel_size,
            "zero_stage": self.cfg.parallel.zero_stage,
            "data_parallel_size": self.dp_size,
        }

    def _client_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond weights: where the run is, and what model it holds
        (so eval/export can rebuild it without the original config or data)."""
        return {
            "megapatch": {
                "progress": self.progress.state_dict(),
                "config": self.cfg.to_dict(),
                **self._identity(),
            }
        }

    def save(self, reason: str, *, final: bool = False) -> None:
        """Checkpoint now. A periodic save that fails is logged loudly and retried at the next
        save point: training goes on, its state still in memory, unless more than
        checkpoint.max_failed_saves saves failed in a row. A failed `final` save (end,
        max_steps, preemption) stops the run with the error: nothing later could save it.

        Every rank takes the same branch: CheckpointManager.save raises on all ranks when any
        rank failed, so the counts, and the decision to stop, agree without a collective."""
        step = self.progress.global_step
        try:
            path = self.ckpt.save(self.engine, step, self._client_state(), rank_state={})
        except CheckpointWriteError as exc:
            self.failed_saves += 1
            self.failed_saves_in_a_row += 1
            latest = self.ckpt.latest()
            since = latest.tag if latest else "the start of the run"
            if final:
                raise CheckpointWriteError(
                    f"{exc}; this was the {reason} checkpoint, so training since {since} is lost: "
                    f"free space in (or fix) {self.ckpt.dir}, then rerun with train.resume=auto"
                ) from None
            limit = self.cfg.checkpoint.max_failed_saves
            # At the run's last step the final save follows at once and reports its own failure.
            more_training = step < self.plan.steps_to_run
            if limit is not None and self.failed_saves_in_a_row > limit and more_training:
                failures = self.failed_saves_in_a_row
                raise CheckpointWriteError(
                    f"{failures} checkpoint save{'s' if failures > 1 else ''} failed in a row "
                    f"(checkpoint.max_failed_saves={limit}), the last: {exc}; stopped after step "
                    f"{step}, the last good checkpoint is {latest.path if latest else 'none'} "
                    f"(training since {since} is lost): free space in (or fix) {self.ckpt.dir}, "
                    "then rerun with train.resume=auto"
                ) from None
            log.error(
                "%s; training goes on and the next save point retries (%d failed in a row, "
                "checkpoint.max_failed_saves=%s; until one succeeds, training since %s exists "
                "only in memory)",
                exc,
                self.failed_saves_in_a_row,
                "null" if limit is None else limit,
                since,
            )
            return
        self.failed_saves_in_a_row = 0
        log.info("checkpoint (%s) at step %d: %s", reason, step, path)

    def maybe_resume(self) -> int | None:
        info = self.resume_from
        if info is None:
            return None
        client_state, _ = self.ckpt.load(self.engine, info)
        state = client_state["megapatch"]
        self.progress = Progress.from_state_dict(state["progress"])
        log.info("resumed from %s at step %d", info.path, self.progress.global_step)
        return self.progress.global_step

    # -- phases ---------------------------------------------------------------------------
    def enter_phase(self, index: int, *, switching: bool) -> Any:
        """Shape the engine and data for phase `index`; returns the micro-batch iterator."""
        phase = self.plan.phases[index]
        self.shape_engine(phase)
        if switching and self.cfg.patch.reset_optimizer:
            cleared = reset_optimizer_state(self.engine)
            log.info(
                "switch to %s phase: optimizer state reset (%d tensors cleared)",
                phase.name,
                cleared,
            )
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
        self.loader = self.open_batches(phase)
        return iter(self.loader)

    def shape_engine(self, phase) -> None:
        """DeepSpeed's batch shape for `phase`; the loss scale 1/accumulation follows from it."""
        self.engine.set_train_micro_batch_size(phase.micro_batch_size)
        self.engine.set_train_batch_size(phase.micro_batch_size * phase.grad_accum * self.dp_size)

    def open_batches(self, phase):
        """This rank's micro-batches of `phase`, from the next window the run has not consumed."""
        from megapatch.data import PrefetchLoader

        sampler = VocabCheckedSampler(
            self.streams[phase.name],
            vocab_size=self.corpus.vocab_size,
            global_batch=phase.sequences_per_step,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        sampler.load_state_dict({"consumed_windows": self.progress.consumed_windows[phase.name]})
        return PrefetchLoader(
            sampler,
            phase.micro_batch_size,
            self.env.device,
            num_workers=self.cfg.data.num_workers,
            prefetch=self.cfg.data.prefetch,
        )

    def close_loader(self) -> None:
        loader, self.loader = getattr(self, "loader", None), None
        if loader is not None:
            loader.close()

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, phase, batches) -> tuple[float, bool, float | None]:
        engine, k = self.engine, phase.patch_size
        set_lr(engine, self.plan.lr(self.progress.global_step))
        losses = []
        self.step_crc = 0 if faults.record_data_crc() else None
        for micro in range(phase.grad_accum):
            batch = next(batches)
            if self.step_crc is not None:
                self.step_crc = zlib.crc32(batch.cpu().numpy().tobytes(), self.step_crc)
            engine.set_gradient_accumulation_boundary(micro == phase.grad_accum - 1)
            loss = engine(batch[:, :-k], batch[:, k:], patch_size=k)
            loss = self._inject_fault(loss)
            losses.append(loss.detach().float())
            engine.backward(loss)
            if micro < phase.grad_accum - 1:
                engine.step()
        mean_loss = torch.stack(losses).mean()
        bad = all_ranks_agree(not bool(torch.isfinite(mean_loss)), self.env.device)
        if bad and not self.native_skip:
            engine.zero_grad()  # plain fp32 optimizers would apply NaN; skip the update ourselves
        else:
            engine.step()  # ZeRO / bf16 skip a non-finite step themselves
        grad_norm = engine.get_global_grad_norm()
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(mean_loss, group=parallel.get_data_parallel_group())
            mean_loss /= self.dp_size
        return float(mean_loss), bad, (float(grad_norm) if grad_norm is not None else None)

    def _inject_fault(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if faults.nan_at(self.progress.global_step) else loss

    def evaluate(self, phase) -> dict[str, float]:
        out: dict[str, float] = {}
        engine = self.engine
        engine.eval()
        try:
            for k, windows in sorted(self.valid_windows.items()):
                if k != 1 and phase.name != "patch":
                    continue
                loss, _ = windowed_loss(
                    engine,
                    windows,
                    patch_size=k,
                    micro_batch_size=phase.micro_batch_size,
                    device=self.env.device,
                    dp_rank=self.dp_rank,
                    dp_size=self.dp_size,
                    dp_group=parallel.get_data_parallel_group(),
                )
                if k == 1:
                    out["val_loss"], out["val_ppl"] = loss, perplexity(loss)
                else:
                    out["val_patch_loss"] = loss
        finally:
            engine.train()
        return out

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
            cfg.save_resolved(self.run_dir)
            (self.run_dir / "plan.txt").write_text(self.plan.table() + "\n")
            # The run directory is self-contained: eval/export/generate find the tokenizer here.
            shutil.copyfile(self.corpus.tokenizer_path, self.run_dir / "tokenizer.model")
        self.metrics = MetricsWriter(
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
        self.preemption.install()
        status = "completed"
        bar = self._progress_bar()
        try:
            status = self._loop(bar)
        finally:
            self.close_loader()
            self.preemption.restore()
            if bar is not None:
                bar.close()
            self.metrics.close()
        summary = self.summary(status)
        if self.is_rank0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return RunResult(status, self.progress.global_step, self.run_dir, summary)

    def _progress_bar(self):
        if not (self.is_rank0 and self.cfg.logging.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.plan.steps_to_run,
            initial=self.progress.global_step,
            unit="step",
            dynamic_ncols=True,
        )

    def _loop(self, bar) -> str:
        cfg, p = self.cfg, self.progress
        max_steps = cfg.train.max_steps
        previous_phase = None
        while p.phase_index < len(self.plan.phases):
            phase = self.plan.phases[p.phase_index]
            if p.step_in_phase >= phase.steps:  # resumed exactly at the end of a phase
                p.phase_index, p.step_in_phase = p.phase_index + 1, 0
                previous_phase = phase
                continue
            switching = previous_phase is not None and previous_phase.name == "patch"
            batches = self.enter_phase(p.phase_index, switching=switching and p.step_in_phase == 0)
            throughput = Throughput()
            while p.step_in_phase < phase.steps:
                if max_steps is not None and p.global_step >= max_steps:
                    self.save("max_steps", final=True)
                    return "max_steps"
                t0 = time.perf_counter()
                loss, bad, grad_norm = self.train_step(phase, batches)
                dt = time.perf_counter() - t0
                p.global_step += 1
                p.step_in_phase += 1
                p.consumed_windows[phase.name] += phase.sequences_per_step
                p.tokens[phase.name] += phase.tokens_per_step
                p.wall_time[phase.name] += dt
                throughput.add(phase.tokens_per_step)
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
                record = self._record(phase, loss, grad_norm, dt, throughput)
                at_phase_end = p.step_in_phase == phase.steps
                if cfg.eval.interval and p.global_step % cfg.eval.interval == 0:
                    record.update(self.evaluate(phase))
                if (
                    p.global_step % cfg.logging.interval == 0
                    or "val_loss" in record
                    or at_phase_end
                ):
                    self.metrics.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(
                        f"{phase.name} loss {loss:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
                    )
                if p.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    self._stop_for_nonfinite()
                stop = all_ranks_agree(self.preemption.requested, self.env.device)
                interval = cfg.checkpoint.interval
                if stop:
                    self.save("preemption", final=True)
                    return "preempted"
                if p.nonfinite_streak:
                    pass  # never make a state inside a run of non-finite losses the latest checkpoint
                elif interval and p.global_step % interval == 0:
                    self.save("interval")
                elif at_phase_end and phase.name == "patch" and cfg.checkpoint.at_switch:
                    self.save("switch")
                faults.maybe_kill_after_step(p.global_step)
                faults.maybe_hang_after_step(p.global_step)
            previous_phase = phase
            p.phase_index, p.step_in_phase = p.phase_index + 1, 0
        last = self.plan.phases[-1]
        if cfg.eval.at_end:
            final = {"step": p.global_step, "phase": last.name, "tokens": sum(p.tokens.values())}
            final.update(self.evaluate(last))
            final["final"] = True
            self.metrics.write(final)
            self.final_eval = final
        self.save("end", final=True)
        return "completed"

    def _stop_for_nonfinite(self) -> None:
        p = self.progress
        latest = self.ckpt.latest()
        raise NonFiniteLossError(
            f"{p.nonfinite_streak} non-finite losses in a row at step {p.global_step} "
            f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); the last good checkpoint "
            f"is {latest.path if latest else 'none'}: lower train.lr or check the data, then resume"
        )

    def _record(
        self, phase, loss: float, grad_norm: float | None, dt: float, throughput: Throughput
    ) -> dict:
        p = self.progress
        tokens_per_s = phase.tokens_per_step / dt if dt > 0 else 0.0
        record = {
            "step": p.global_step,
            "phase": phase.name,
            "patch_size": phase.patch_size,
            "tokens": sum(p.tokens.values()),
            "loss": loss,
            "lr": self.plan.lr(p.global_step - 1),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": dt,
            "flops": self.plan.flops_so_far(self.progress.global_step),
            "wall_time_s": sum(p.wall_time.values()),
            "nonfinite_total": p.nonfinite_total,
        }
        if self.step_crc is not None:
            record["data_crc"] = self.step_crc
        if self.peak:
            record["mfu"] = phase.flops_per_step / dt / (self.peak * self.env.world_size)
        return record

    def summary(self, status: str) -> dict[str, Any]:
        p = self.progress
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
            "failed_saves": self.failed_saves,
            "planned_cost_ratio": self.plan.cost_ratio,
            "flops": self.plan.flops_so_far(self.progress.global_step),
        }
        final = getattr(self, "final_eval", None)
        if final:
            summary["val_loss"] = final.get("val_loss")
            summary["val_ppl"] = final.get("val_ppl")
        token_rate = tokens_per_s.get("token")
        if status == "completed" and token_rate:
            # Wall time of this run against a token-only run of the same budget at the measured token-phase speed.
            token_only = sum(p.tokens.values()) / token_rate
            summary["measured_cost_ratio"] = sum(p.wall_time.values()) / token_only
        return summary


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


__all__ = ["train", "Trainer", "RunResult", "Progress", "NonFiniteLossError"]
