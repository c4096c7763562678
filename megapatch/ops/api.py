"""The four public ops: validate, pick a backend, flatten shapes, call it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megapatch.errors import ConfigError
from megapatch.ops import reference
from megapatch.ops._checks import (
    check_embedding_inputs,
    check_loss_inputs,
    group_size,
    resolve_backend,
)


def _backend_module(name: str):
    if name == "reference":
        return reference
    if name == "torch":
        from megapatch.ops import chunked

        return chunked
    from megapatch.ops import triton_ops

    return triton_ops


def _tensor_parallel_group(op: str, group, vocab_start: int, vocab_shard: int):
    """(group to reduce over, or None for a single rank, i.e. no collectives; its size)."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD  # torch's convention: None is the default group
    world = group_size(group)
    if not 0 <= vocab_start <= (world - 1) * vocab_shard or vocab_start % max(vocab_shard, 1):
        raise ConfigError(
            f"{op}: vocab_start={vocab_start} is not a shard boundary of {world} shards of "
            f"{vocab_shard} rows; expected rank * {vocab_shard}"
        )
    return (group if world > 1 else None), world


def _normalised(position_weights: torch.Tensor | None) -> dict:
    """The backends' keyword: fp32 weights summing to 1, or nothing at all for None, so the
    unweighted call reaches the backends exactly as it did before weights existed."""
    if position_weights is None:
        return {}
    w = position_weights.detach().to(torch.float32)
    return {"position_weights": w / w.sum()}


def patch_embedding(
    ids: torch.Tensor, weight: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Mean of the K embedding rows of each patch: ids [..., K], weight [V, D] → [..., D]."""
    check_embedding_inputs("patch_embedding", ids, weight, weight.shape[0])
    impl = _backend_module(resolve_backend(backend, ids, weight))
    out = impl.patch_embedding(ids.reshape(-1, ids.shape[-1]).long(), weight)  # [M, D]
    return out.reshape(*ids.shape[:-1], weight.shape[1])


def vocab_parallel_patch_embedding(
    ids: torch.Tensor,
    weight_shard: torch.Tensor,
    *,
    vocab_start: int,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """`patch_embedding` over a vocabulary split across `group`.

    `ids` are global and replicated on every rank; this rank holds rows
    [vocab_start, vocab_start + V_shard) of the padded weight. Out-of-shard ids contribute
    zero, the sum is divided by K (not by the in-shard count) and all-reduced, so every
    rank returns the full replicated result. `group` is the tensor-parallel group (None:
    torch's default group); a group of one rank is the plain op.
    """
    op = "vocab_parallel_patch_embedding"
    group, world = _tensor_parallel_group(op, group, vocab_start, weight_shard.shape[0])
    vocab_total = world * weight_shard.shape[0]
    check_embedding_inputs(op, ids, weight_shard, vocab_total)
    impl = _backend_module(resolve_backend(backend, ids, weight_shard))
    out = impl.patch_embedding(
        ids.reshape(-1, ids.shape[-1]).long(), weight_shard, vocab_start=vocab_start, group=group
    )
    return out.reshape(*ids.shape[:-1], weight_shard.shape[1])


def patch_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    position_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-target cross-entropy of one distribution per row against K targets.

    hidden [N, D], weight [V, D], targets [N, K] → scalar: the mean over non-ignored
    targets of logsumexp(h·Wᵀ) − (h·Wᵀ)[y]. Rows of `weight` at index ≥ `vocab_size`
    are padding and get no probability mass. All targets ignored → 0 with zero gradients.

    `position_weights` [K] (non-negative, not all zero, on hidden's device; normalised
    here) makes it the weighted mean: Σ w_k·m·(lse − z[y]) / Σ w_k·m over the
    non-ignored targets (m = 1). None is the unweighted loss, computed as before the
    weights existed. The weights get no gradient.
    """
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    check_loss_inputs(
        "patch_loss",
        hidden,
        weight,
        targets,
        ignore_index=ignore_index,
        vocab_size=vocab_size,
        vocab_total=weight.shape[0],
        position_weights=position_weights,
    )
    impl = _backend_module(resolve_backend(backend, hidden, weight))
    return impl.patch_loss(
        hidden,
        weight,
        targets.long(),
        vocab_start=0,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        **_normalised(position_weights),
    )


def vocab_parallel_patch_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    position_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """`patch_loss` over a vocabulary split across `group`.

    hidden and targets are replicated on every rank; this rank holds rows
    [vocab_start, vocab_start + V_shard) of the padded weight. Forward combines the shards
    with a MAX and one packed SUM all-reduce; backward all-reduces the hidden gradient
    inside the op, so the caller needs no extra mapping. `vocab_size` is the real (unpadded)
    vocabulary; `group` as in `vocab_parallel_patch_embedding`; `position_weights` as in
    `patch_loss`, the same on every rank.
    """
    op = "vocab_parallel_patch_loss"
    group, world = _tensor_parallel_group(op, group, vocab_start, weight_shard.shape[0])
    check_loss_inputs(
        op,
        hidden,
        weight_shard,
        targets,
        ignore_index=ignore_index,
        vocab_size=vocab_size,
        vocab_total=world * weight_shard.shape[0],
        position_weights=position_weights,
    )
    impl = _backend_module(resolve_backend(backend, hidden, weight_shard))
    return impl.patch_loss(
        hidden,
        weight_shard,
        targets.long(),
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        group=group,
        **_normalised(position_weights),
    )
