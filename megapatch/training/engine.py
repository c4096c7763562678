"""The DeepSpeed side of optimisation: its config, weight-decay groups, LR, state reset.

megapatch owns the LR schedule (megapatch.schedule) and the phase switch, so DeepSpeed
gets no scheduler and no curriculum; we set the LR on the optimizer every step.
"""

from __future__ import annotations

from typing import Any

import torch


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


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer at the bottom of DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and opt.optimizer is not opt and opt.optimizer is not None:
        opt = opt.optimizer
    return opt


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


def skips_nonfinite_steps(engine) -> bool:
    """ZeRO and the bf16/fp16 optimizers skip a step whose gradients are not finite; plain fp32 does not."""
    return bool(
        engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
    )
