"""The DeepSpeed engine: its config, weight-decay groups, building it, the batch shape of a
phase, the LR, the optimizer reset at a switch, and the gradient norm. With pipeline
parallelism it is DeepSpeed's pipeline engine, which runs a whole optimizer step (1F1B
over the step's micro-batches) in `train_batch`.

megapatch owns the LR schedule (megapatch.training.schedule) and the phase switch, so
DeepSpeed gets no scheduler and no curriculum; we set the LR on the optimizer every step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from megapatch.checkpoint.manager import base_optimizer


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum: int,
    dp_size: int,
    zero_stage: int,
    precision: str,
    grad_clip: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    on_cuda: bool,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for the first phase; batch shape changes later via the engine."""
    optimizer_params: dict[str, Any] = {
        "lr": lr,
        "betas": list(betas),
        "eps": eps,
        "weight_decay": weight_decay,
    }
    # torch's own AdamW: DeepSpeed's Adam would JIT-compile a C++ (CPU) or CUDA extension in
    # every fresh environment, which needs a compiler on every node and minutes at start.
    # On CUDA the fused kernel updates all tensors in a few launches, like DeepSpeed's.
    optimizer_params["torch_adam"] = True
    if on_cuda:
        optimizer_params["fused"] = True
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
        "wandb": {"enabled": False},  # its step axis is samples; we log to wandb ourselves
        "tensorboard": {"enabled": False},
        "csv_monitor": {"enabled": False},
    }
    if zero_stage in (1, 2):
        # contiguous gradients keep the reduce buckets simple and deterministic on CPU
        config["zero_optimization"].update(contiguous_gradients=True, overlap_comm=on_cuda)
    if overrides:
        _deep_update(config, overrides)
    return config


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (including embeddings); never decay norm gains or other vectors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def set_lr(engine, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


def reset_optimizer_state(engine) -> int:
    """Forget Adam's moments and step counts in place (the paper's switch); returns #tensors cleared."""
    opt = base_optimizer(engine)
    cleared = len(opt.state)
    opt.state.clear()
    return cleared


def optimizer_state_size(engine) -> int:
    return len(base_optimizer(engine).state)


def _optimizer_is_wrapped(engine) -> bool:
    """ZeRO and the bf16/fp16 modes wrap the optimizer in one of DeepSpeed's own; plain
    fp32 without ZeRO steps torch's optimizer directly."""
    return bool(
        engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
    )


def skips_nonfinite_steps(engine) -> bool:
    """DeepSpeed's wrapping optimizers skip a step whose gradients are not finite; plain fp32 does not."""
    return _optimizer_is_wrapped(engine)


def build_model(cfg, model_config, device: torch.device, *, dp_size: int) -> torch.nn.Module:
    """This rank's model: the GPT's TP shard, or with pipeline parallelism its stage of it
    (a DeepSpeed PipelineModule), initialised from the run's seed or `init.from_hf`."""
    from megapatch import parallel

    pp = cfg.parallel.pipeline_model_parallel_size
    if pp > 1:
        from megapatch.model.pipeline import build_pipeline_model

        topology = parallel.pipeline_topology(cfg.parallel.tensor_model_parallel_size, pp, dp_size)
        model = build_pipeline_model(model_config, cfg.run.seed, topology, pp)
    else:
        from megapatch.model import GPT

        model = GPT(model_config, seed=cfg.run.seed).to(device)
    if cfg.init.from_hf:
        from megapatch.checkpoint.hf import load_hf_into_model

        load_hf_into_model(model, cfg.init.from_hf)
    if cfg.train.compile:
        model.compile_blocks()
    return model


def build_engine(
    model: torch.nn.Module,
    cfg,
    first_phase,
    *,
    dp_size: int,
    device: torch.device,
    load_universal: bool = False,
):
    """The DeepSpeed engine of `model` for run config `cfg`, shaped for its first phase;
    ZeRO shards over the data-parallel group only (megapatch.parallel.mpu).
    `load_universal`: the checkpoint to resume is a universal one (checkpoint/reshard.py)."""
    import deepspeed

    from megapatch import parallel
    from megapatch.checkpoint.reshard import universal_checkpoint_info

    pipelined = cfg.parallel.pipeline_model_parallel_size > 1
    # Saved in every checkpoint: how to merge the TP shards when it is resharded.
    model.universal_checkpoint_info = universal_checkpoint_info(model)

    t = cfg.train
    config = deepspeed_config(
        micro_batch_size=first_phase.micro_batch_size,
        grad_accum=first_phase.grad_accum,
        dp_size=dp_size,
        zero_stage=cfg.parallel.zero_stage,
        precision=t.precision,
        grad_clip=t.grad_clip,
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        weight_decay=t.weight_decay,
        on_cuda=device.type == "cuda",
        overrides=cfg.parallel.deepspeed,
    )
    if load_universal and cfg.parallel.zero_stage > 0:  # ZeRO-0: megapatch loads it (zero0.py)
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    guarded = pipelined and not _wraps_optimizer(config)
    if pipelined:
        # Activations cross a stage boundary whole: sent in 1/TP slices and gathered by the
        # receiver (DeepSpeed's partitioning) only when every TP rank holds the same tensor,
        # which sequence parallelism breaks (each holds its own L/TP positions).
        sliced = not cfg.parallel.sequence_parallel
        config["pipeline"] = {
            "pipe_partitioned": sliced,
            "grad_partitioned": sliced,
            **config.get("pipeline", {}),
        }
        if guarded:
            config["gradient_clipping"] = 0.0  # clipped by PipelineStepGuard, norm kept
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=config,
        # The pipeline module brings its own mpu: DeepSpeed's grid of the same topology.
        mpu=None if pipelined else parallel.mpu,
    )
    if guarded:
        engine.step_guard = PipelineStepGuard(engine, t.grad_clip)
    _mark_tensor_parallel_gradients(engine.optimizer)
    return engine


def _mark_tensor_parallel_gradients(optimizer) -> None:
    """DeepSpeed's unfused mixed-precision optimizer (bf16/fp16 without ZeRO, no pipeline)
    computes the gradient norm it clips by, and reports, from the gradient tensors, which
    do not carry their parameters' `tensor_model_parallel` mark: on every TP rank but the
    first it takes them all for replicated copies and leaves them out, so the norm misses
    most of the sharded weights' gradients. Mark the gradients before each step."""
    if not (hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups")):
        return
    sharded = [
        p
        for group in optimizer.fp16_groups
        for p in group
        if getattr(p, "tensor_model_parallel", False)
    ]
    if not sharded:
        return
    step = optimizer.step

    def step_with_marked_gradients(*args, **kwargs):
        for param in sharded:
            if param.grad is not None:
                param.grad.tensor_model_parallel = True
        return step(*args, **kwargs)

    optimizer.step = step_with_marked_gradients


def _wraps_optimizer(config: dict[str, Any]) -> bool:
    return bool(
        config["zero_optimization"]["stage"] > 0
        or config["bf16"]["enabled"]
        or config["fp16"]["enabled"]
    )


def is_pipeline(engine) -> bool:
    """DeepSpeed's pipeline engine: it runs whole steps (`train_batch`, `eval_batch`)."""
    return hasattr(engine, "train_batch")


class PipelineStepGuard:
    """For the pipeline engine in plain fp32 without ZeRO, where DeepSpeed would apply a
    non-finite step and keeps no gradient norm (and `train_batch` leaves no moment between
    the last backward and the step): the optimizer's step first clips (DeepSpeed's own
    clipping is turned off), keeping the norm before clipping, and skips a non-finite one.
    The norm is summed over the whole model (every stage and TP rank), so every rank
    takes the same decision."""

    def __init__(self, engine, max_norm: float):
        self.engine, self.max_norm = engine, max_norm
        self.optimizer = base_optimizer(engine)
        self._step = self.optimizer.step
        self.optimizer.step = self.step
        self.grad_norm: float | None = None

    def step(self, *args, **kwargs):
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        limit = self.max_norm if self.max_norm > 0 else math.inf
        norm = clip_grad_norm_(params, max_norm=limit, mpu=_TensorParallelRankView(self.engine.mpu))
        self.grad_norm = float(norm)
        if not math.isfinite(self.grad_norm):
            return None  # skipped, as DeepSpeed's wrapping optimizers skip it
        return self._step(*args, **kwargs)


class _TensorParallelRankView:
    """DeepSpeed's pipeline grid as `clip_grad_norm_` should see it: the norm is summed over
    the whole model-parallel group (every stage and TP rank), but a TP-replicated parameter
    is counted by TP rank 0 of its own stage. The grid's model-parallel rank is 0 on the
    first stage only, so clip_grad_norm_ given the grid would drop the later stages' norm
    gains from the norm."""

    def __init__(self, grid):
        self.grid = grid

    def get_model_parallel_group(self):
        return self.grid.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self.grid.get_tensor_model_parallel_rank()


def shape_engine(engine, phase, dp_size: int) -> None:
    """DeepSpeed's batch shape for `phase`; the loss scale 1/accumulation follows from it.
    A pipeline also learns the phase's K and target weights, and re-sizes its stage
    buffers (the micro-batch may change at a switch)."""
    engine.set_train_micro_batch_size(phase.micro_batch_size)
    engine.set_train_batch_size(phase.micro_batch_size * phase.grad_accum * dp_size)
    if is_pipeline(engine):
        engine.module.set_phase(phase.patch_size, phase.position_weights)
        engine.reset_activation_shape()


def keeps_grad_norm(engine) -> bool:
    """Whether DeepSpeed records the global gradient norm of a step: its wrapping
    optimizers do; ZeRO-0 in fp32 clips without keeping it (`get_global_grad_norm()` is None)."""
    return _optimizer_is_wrapped(engine)


def grad_norm_before_step(engine) -> float:
    """The global gradient norm, before clipping, of the gradients about to be applied, for
    the modes where DeepSpeed keeps none: computed by the function the engine clips with,
    so sharded TP gradients are summed over the TP group and replicated ones counted once.
    Call it after the last backward of the step, before `engine.step()`."""
    from deepspeed.runtime.utils import clip_grad_norm_

    from megapatch import parallel

    params = [p for p in engine.module.parameters() if p.grad is not None]
    # An infinite max_norm leaves the gradients as they are; only the norm is computed.
    return float(clip_grad_norm_(params, max_norm=float("inf"), mpu=parallel.mpu))


def pipeline_train_step(engine, batches, phase, on_batch, poison: bool = False):
    """One optimizer step of the pipeline engine: `train_batch` runs the phase's
    micro-batches through the stages (1F1B), reduces the gradients and steps. `batches`
    yields the windows; only the first and last stages take any (DeepSpeed reads data
    there alone); `on_batch` sees each window batch taken. Returns (loss, grad norm before clipping): the loss is the mean
    over the micro-batches and DP ranks, on every rank. `poison` makes the loss NaN (the
    fault hook's test of non-finite steps)."""
    k = phase.patch_size

    def micro_batches():
        for _ in range(phase.grad_accum):
            batch = next(batches)
            on_batch(batch)
            yield batch[:, :-k], batch[:, k:]

    with _poisoned_loss(engine.module, poison):
        loss = float(engine.train_batch(micro_batches()))
    guard = getattr(engine, "step_guard", None)
    grad_norm = guard.grad_norm if guard is not None else engine.get_global_grad_norm()
    return loss, (float(grad_norm) if grad_norm is not None else None)


@contextlib.contextmanager
def _poisoned_loss(pipe, poison: bool):
    original = pipe.loss_fn
    if poison and original is not None:  # the loss is computed on the last stage only
        pipe.loss_fn = lambda outputs, labels: original(outputs, labels) * float("nan")
    try:
        yield
    finally:
        pipe.loss_fn = original
