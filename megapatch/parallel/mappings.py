"""Autograd-aware collectives over the tensor-parallel group (Megatron-core names).

Each mapping is the transpose of another in backward:
    copy_to     forward identity          backward all-reduce
    reduce_from forward all-reduce        backward identity
    scatter_to  forward split last dim    backward all-gather last dim
    gather_from forward all-gather        backward split last dim
With TP=1 all four are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megapatch.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.clone()  # never reduce in place into a tensor autograd may still need
    dist.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    if x.shape[-1] % world_size != 0:
        raise ValueError(
            f"last dimension {x.shape[-1]} is not divisible by the TP size {world_size}"
        )
    chunk = x.shape[-1] // world_size
    start = get_tensor_model_parallel_rank() * chunk
    return x[..., start : start + chunk].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _mapping(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd mapping: `forward` on the activation, `backward` on its gradient."""
    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(lambda ctx, x: forward(x)),
            "backward": staticmethod(lambda ctx, grad: backward(grad)),
        },
    )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_CopyToModelParallelRegion = _mapping("_CopyToModelParallelRegion", _identity, _all_reduce)
_ReduceFromModelParallelRegion = _mapping("_ReduceFromModelParallelRegion", _all_reduce, _identity)
_ScatterToModelParallelRegion = _mapping(
    "_ScatterToModelParallelRegion", _split_last_dim, _gather_last_dim
)
_GatherFromModelParallelRegion = _mapping(
    "_GatherFromModelParallelRegion", _gather_last_dim, _split_last_dim
)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Enter a TP region with a replicated input: its gradient is summed over TP ranks."""
    return _CopyToModelParallelRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Leave a TP region by summing the ranks' partial results."""
    return _ReduceFromModelParallelRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of the last dimension."""
    return _ScatterToModelParallelRegion.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dimension, in TP rank order."""
    return _GatherFromModelParallelRegion.apply(x)


# -- sequence parallelism: activations [B, L, D] split along L inside TP regions ----------
# Megatron's scheme: norms and residual adds run on this rank's L/tp positions; the
# column-parallel layers all-gather the sequence first, the row-parallel ones reduce-scatter
# their partial sums back to it.
SEQUENCE_DIM = 1


def _check_sequence_splits(x: torch.Tensor, world_size: int) -> None:
    if x.shape[SEQUENCE_DIM] % world_size != 0:
        raise ValueError(
            f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by the TP size {world_size}"
        )


def split_sequence(x: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    _check_sequence_splits(x, world_size)
    return x.chunk(world_size, dim=SEQUENCE_DIM)[get_tensor_model_parallel_rank()].contiguous()


def all_gather_sequence(x: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    x = x.movedim(SEQUENCE_DIM, 0).contiguous()
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=get_tensor_model_parallel_group())
    return out.movedim(0, SEQUENCE_DIM)


def reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    _check_sequence_splits(x, world_size)
    x = x.movedim(SEQUENCE_DIM, 0).contiguous()
    out = x.new_empty((x.shape[0] // world_size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=get_tensor_model_parallel_group())
    return out.movedim(0, SEQUENCE_DIM)


_ScatterToSequenceParallelRegion = _mapping(
    "_ScatterToSequenceParallelRegion", split_sequence, all_gather_sequence
)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        # Into a column-parallel layer each rank's gradient is a partial sum: reduce-scatter.
        # Into an op that already sums over TP (the vocab-parallel loss): keep our slice.
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_sequence(grad), None
        return split_sequence(grad), None


_ReduceScatterToSequenceParallelRegion = _mapping(
    "_ReduceScatterToSequenceParallelRegion", reduce_scatter_sequence, all_gather_sequence
)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's L/tp positions of a replicated [B, L, ...] activation."""
    return _ScatterToSequenceParallelRegion.apply(x)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence: [B, L/tp, ...] -> [B, L, ...]. `tensor_parallel_output_grad`:
    the consumer's gradient is a per-rank partial sum (a column-parallel layer) rather than
    already complete on every rank."""
    return _GatherFromSequenceParallelRegion.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial [B, L, ...] results and keep this rank's L/tp positions."""
    return _ReduceScatterToSequenceParallelRegion.apply(x)
