"""Shared by the loss backends: position weights (the unweighted path never comes here), and
the backward of a loss whose gradients were computed in its forward."""

from __future__ import annotations

import torch


def weighted_counts(kept: torch.Tensor, position_weights: torch.Tensor):
    """Each row's total weight of scored targets [N] and the loss's normaliser (a scalar).

    kept [N, K] marks the non-ignored targets, position_weights [K] is fp32. When nothing
    is scored (all ignored, or only zero-weight positions kept) the normaliser is 1, so the
    loss is 0 with zero gradients rather than NaN, as in the unweighted loss.
    """
    counts = torch.where(kept, position_weights, 0.0).sum(dim=1)  # [N]
    total = counts.sum()
    return counts, torch.where(total > 0, total, 1.0)


def hand_out_stored_gradients(ctx, grad_loss: torch.Tensor, op: str) -> tuple:
    """The backward of a loss that computed its gradients in the forward (`ctx.grads`,
    [grad_hidden or None, grad_weight or None] for a unit upstream gradient): scaled by the
    upstream gradient, in the inputs' dtypes, handed out once (then freed)."""
    h_dtype, w_dtype = ctx.dtypes
    if ctx.grads is None:
        raise RuntimeError(
            f"patch_loss ({op}) computes its gradients during the forward and hands them out "
            "once; backward through it twice is not supported"
        )
    grad_h, grad_w = ctx.grads
    ctx.grads = None  # free them as soon as autograd has them
    g = grad_loss.float()
    grad_h = None if grad_h is None else grad_h.mul_(g).to(h_dtype)
    grad_w = None if grad_w is None else grad_w.mul_(g).to(w_dtype)
    return grad_h, grad_w
