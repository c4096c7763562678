"""The two autograd-aware collectives of a replicated-input, vocab-sharded op (Megatron's
copy and reduce regions, kept private to the ops so they need nothing from `parallel`)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CopyToGroup(torch.autograd.Function):
    """Identity forward; sum the gradient over the group backward (the input is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromGroup(torch.autograd.Function):
    """Sum over the group forward; identity backward (the output is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None
