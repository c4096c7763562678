"""Validation: token-level loss (the number that matters, in every phase) and, during a
patch stage, that stage's patch-level loss (its K and target weights) on the same held-out
text."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from megapatch.training.engine import is_pipeline

IGNORE_INDEX = -100


@torch.no_grad()
def windowed_loss(
    forward: Callable[..., torch.Tensor],
    windows: Iterable[np.ndarray] | np.ndarray,
    *,
    patch_size: int,
    micro_batch_size: int,
    device: torch.device,
    dp_rank: int = 0,
    dp_size: int = 1,
    dp_group=None,
    position_weights=None,
) -> tuple[float, int]:
    """Mean loss over `windows` ([n, K·L+K] each) split across data-parallel ranks.

    Returns (mean loss per target token, number of target tokens). Every rank returns the
    same numbers; tensor-parallel peers see the same windows. `position_weights`: the
    forward's (the K targets' weights; None = uniform).
    """
    windows = np.asarray(windows if isinstance(windows, np.ndarray) else list(windows))
    k = patch_size
    weighted = {} if position_weights is None else {"position_weights": position_weights}
    # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively; a
    # pipeline's stages run them together): a rank short of windows repeats one with all
    # its targets ignored.
    per_rank = -(-len(windows) // dp_size)
    pipelined = is_pipeline(forward)
    if pipelined:  # whole micro-batches: the stage buffers keep one shape
        per_rank = -(-per_rank // micro_batch_size) * micro_batch_size
    mine = list(range(dp_rank, len(windows), dp_size))
    n_real = len(mine)
    mine += [0] * (per_rank - n_real)
    micro_batches = []
    for start in range(0, per_rank, micro_batch_size):
        idx = mine[start : start + micro_batch_size]
        batch = torch.from_numpy(windows[idx].astype(np.int64)).to(device)
        targets = batch[:, k:].clone()
        n_pad = max(0, start + len(idx) - n_real)
        if n_pad:
            targets[len(idx) - n_pad :] = IGNORE_INDEX
        micro_batches.append((batch[:, :-k], targets))
    if pipelined:
        losses = pipeline_losses(forward, micro_batches, patch_size=k, **weighted)
    else:
        losses = [forward(x, y, patch_size=k, **weighted) for x, y in micro_batches]
    total = torch.zeros(2, dtype=torch.float64)  # [sum of losses, target tokens]
    for (_, targets), loss in zip(micro_batches, losses):
        n_targets = int((targets != IGNORE_INDEX).sum())
        if n_targets:  # an all-padding micro-batch's mean is 0/0
            total += torch.tensor([float(loss) * n_targets, n_targets], dtype=torch.float64)
    if dist.is_initialized() and dp_size > 1:
        dist.all_reduce(total, group=dp_group)
    loss_sum, count = total.tolist()
    return (loss_sum / count if count else math.nan), int(count)


def pipeline_losses(engine, micro_batches, *, patch_size: int, position_weights=None):
    """Each micro-batch's mean loss, on every rank, from one pass of DeepSpeed's pipeline
    engine over all of them (so the stages overlap); the phase's K and target weights
    are restored afterwards. Micro-batches must share one shape (the stage buffers' size)."""
    from megapatch import parallel

    pipe = engine.module
    saved = (pipe.phase.patch_size, pipe.phase.position_weights)
    pipe.set_phase(patch_size, position_weights)
    try:
        out = engine.eval_batch(
            iter(micro_batches),
            num_micro_batches=len(micro_batches),
            reduce_output=None,  # per micro-batch; the caller weights them by their targets
            bcast_loss=False,
        )
    finally:
        pipe.set_phase(*saved)
    losses = torch.zeros(len(micro_batches), dtype=torch.float32, device=engine.device)
    if parallel.is_pipeline_last_stage():
        losses.copy_(torch.stack([loss.float().reshape(()) for loss in out]))
    last = parallel.get_pipeline_model_parallel_ranks()[-1]
    dist.broadcast(losses, src=last, group=parallel.get_pipeline_model_parallel_group())
    return losses.tolist()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf


class Validator:
    """What is evaluated, and when: token-level loss and perplexity on the validation
    windows in every phase, and the current stage's patch-level loss too (`val_patch_loss`,
    with the stage's K and position weights) during a patch stage; every
    `eval.interval` steps and after the last step (`eval.at_end`)."""

    def __init__(
        self, section, windows: dict[int, np.ndarray], *, device, dp_rank, dp_size, dp_group
    ):
        """`section`: the run config's `eval` section; `windows`: {K: [n, K·L+K] windows}."""
        self.interval, self.at_end = section.interval, section.at_end
        self.windows = windows
        self.device, self.dp_rank, self.dp_size, self.dp_group = device, dp_rank, dp_size, dp_group

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def run(self, engine, phase) -> dict[str, float]:
        out: dict[str, float] = {}
        engine.eval()
        try:
            for k, windows in sorted(self.windows.items()):
                if k not in (1, phase.patch_size):
                    continue
                loss, _ = windowed_loss(
                    engine,
                    windows,
                    patch_size=k,
                    micro_batch_size=phase.micro_batch_size,
                    device=self.device,
                    dp_rank=self.dp_rank,
                    dp_size=self.dp_size,
                    dp_group=self.dp_group,
                    position_weights=None if k == 1 else phase.position_weights,
                )
                if k == 1:
                    out["val_loss"], out["val_ppl"] = loss, perplexity(loss)
                else:
                    out["val_patch_loss"] = loss
        finally:
            engine.train()
        return out
