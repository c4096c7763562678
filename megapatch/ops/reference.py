"""The oracle: straightforward PyTorch with full fp32 logits. Clear, slow, memory-hungry.

The vocab-parallel forms are the textbook Megatron decomposition: a copy region on the
input (identity forward, all-reduce of the gradient backward) and reduce regions on the
per-shard partial sums (all-reduce forward, identity backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megapatch.ops._collectives import CopyToGroup, ReduceFromGroup
from megapatch.ops._weights import weighted_counts


def patch_embedding(ids, weight, *, vocab_start=0, group=None):
    """Mean of the K rows of `weight` named by `ids [M, K]` (in-shard rows only) → [M, D]."""
    k = ids.shape[-1]
    local = ids - vocab_start
    in_shard = (local >= 0) & (local < weight.shape[0])
    rows = weight.float()[local.clamp(0, weight.shape[0] - 1)]  # [M, K, D]
    out = (rows * in_shard.unsqueeze(-1)).sum(-2) / k  # [M, D]
    if group is not None:
        out = ReduceFromGroup.apply(out, group)
    return out.to(weight.dtype)


def patch_loss(
    hidden,
    weight,
    targets,
    *,
    vocab_start=0,
    vocab_size,
    ignore_index=-100,
    group=None,
    position_weights=None,
):
    """Mean over non-ignored targets of logsumexp(z) − z[y], z = h·Wᵀ in fp32; with
    `position_weights` [K] (normalised fp32) the mean weighted by each target's position."""
    if group is not None:
        hidden = CopyToGroup.apply(hidden, group)
    logits = hidden.float() @ weight.float().t()  # [N, V_shard]
    real_cols = min(max(vocab_size - vocab_start, 0), weight.shape[0])
    logits[:, real_cols:] = float("-inf")  # padding rows get no probability mass

    row_max = logits.detach().max(dim=1).values  # [N]
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)  # [N]

    kept = targets != ignore_index  # [N, K]
    local = targets - vocab_start
    in_shard = kept & (local >= 0) & (local < weight.shape[0])
    target_logits = logits.gather(1, local.clamp(0, weight.shape[0] - 1))  # [N, K]
    target_logits = torch.where(in_shard, target_logits, 0.0)
    if position_weights is not None:
        target_logits = target_logits * position_weights
    target_sum = target_logits.sum(dim=1)  # [N]

    if group is not None:
        packed = ReduceFromGroup.apply(torch.stack([sum_exp, target_sum]), group)
        sum_exp, target_sum = packed[0], packed[1]
    lse = row_max + torch.log(sum_exp)  # [N]
    if position_weights is None:
        counts = kept.sum(dim=1)  # [N]
        total = counts.sum().clamp(min=1)
    else:
        counts, total = weighted_counts(kept, position_weights)
    return ((counts * lse).sum() - target_sum.sum()) / total
