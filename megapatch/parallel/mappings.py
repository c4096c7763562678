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


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


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
