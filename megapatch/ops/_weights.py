"""Position weights shared by the loss backends (the unweighted path never comes here)."""

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
