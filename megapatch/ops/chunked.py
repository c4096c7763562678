"""The "torch" backend: plain PyTorch, memory bounded independently of N·V.

patch_loss walks the rows in chunks so that at most one [C, V_shard] block of fp32
logits is alive at a time. Single-process with gradients it uses the fused-linear-
cross-entropy trick: each chunk's logits are turned into their gradient on the spot, so
the forward does all three matmuls and the backward only scales the stored gradients.
With a vocab-parallel group the softmax needs every shard's statistics first, so the
forward does one pass (MAX + one packed SUM all-reduce) and the backward recomputes the
logits chunk by chunk.

patch_embedding is F.embedding_bag for fp32 weights (the fastest CPU gather-mean, forward
and backward); 16-bit weights take a small fp32-accumulating function instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megapatch.ops._collectives import ReduceFromGroup
from megapatch.ops._weights import hand_out_stored_gradients, weighted_counts

# At most this many fp32 logits alive per chunk (32 MiB): large enough that the matmuls
# run at full speed and the per-chunk update of the [V, D] weight gradient stays rare.
LOGITS_PER_CHUNK = 1 << 23

# Single-process: compute the gradients during the forward (three matmuls in all) rather
# than recomputing the logits in backward (four). bench/ops.py measures both.
FUSE_GRAD_IN_FORWARD = True


def _rows_per_chunk(n_rows: int, vocab_shard: int) -> int:
    return max(1, min(n_rows, LOGITS_PER_CHUNK // max(vocab_shard, 1)))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


# ----------------------------------------------------------------------------- embedding


class _LowPrecisionPatchEmbedding(torch.autograd.Function):
    """Gather-mean whose sums run in fp32: F.embedding_bag accumulates in the weight dtype,
    and its bf16 backward adds every duplicate id's gradient in bf16."""

    @staticmethod
    def forward(ctx, ids, weight, vocab_start, group):
        k = ids.shape[1]
        local = ids - vocab_start  # [M, K]
        in_shard = (local >= 0) & (local < weight.shape[0])
        # Out-of-shard ids point at a spare row (index V_shard) that backward drops.
        local = torch.where(in_shard, local, weight.shape[0])
        out = torch.zeros(ids.shape[0], weight.shape[1], dtype=torch.float32, device=weight.device)
        for j in range(k):
            rows = weight.index_select(0, local[:, j].clamp(max=weight.shape[0] - 1))
            out.add_(rows.float() * in_shard[:, j, None])
        out.div_(k)
        if group is not None:
            dist.all_reduce(out, group=group)
        ctx.save_for_backward(local)
        ctx.shape = (weight.shape[0], weight.dtype)
        return out.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (local,) = ctx.saved_tensors  # [M, K]
        vocab_shard, dtype = ctx.shape
        grad_out = grad_out.float() / local.shape[1]  # [M, D]
        grad_weight = torch.zeros(
            vocab_shard + 1, grad_out.shape[1], dtype=torch.float32, device=grad_out.device
        )
        for j in range(local.shape[1]):  # K index_add_ calls: no [M·K, D] intermediate
            grad_weight.index_add_(0, local[:, j], grad_out)
        return None, grad_weight[:vocab_shard].to(dtype), None, None


def patch_embedding(ids, weight, *, vocab_start=0, group=None):
    """ids [M, K] (global), weight [V_shard, D] → [M, D], mean of the K rows."""
    if weight.dtype != torch.float32:
        return _LowPrecisionPatchEmbedding.apply(ids, weight, vocab_start, group)
    # fp32: F.embedding_bag is the fastest gather-mean on CPU, forward and backward
    # (bench/ops.py); writing our own only lost time.
    if group is None:
        return F.embedding_bag(ids, weight, mode="mean")
    local = ids - vocab_start
    in_shard = (local >= 0) & (local < weight.shape[0])
    scale = in_shard.to(weight.dtype) / ids.shape[1]  # divide by K, not by the in-shard count
    out = F.embedding_bag(
        torch.where(in_shard, local, 0), weight, mode="sum", per_sample_weights=scale
    )
    return ReduceFromGroup.apply(out, group)


# ----------------------------------------------------------------------------- loss


class _Targets:
    """Per-row target bookkeeping shared by forward and backward."""

    def __init__(self, targets, vocab_start, vocab_shard, ignore_index, position_weights=None):
        kept = targets != ignore_index  # [N, K]
        local = targets - vocab_start
        in_shard = kept & (local >= 0) & (local < vocab_shard)
        self.local = torch.where(in_shard, local, 0)  # [N, K] column in this shard
        self.in_shard = in_shard  # [N, K]
        if position_weights is None:
            self.picked_weight = None
            self.counts = kept.sum(dim=1).float()  # [N] targets scored by each row
            self.total = self.counts.sum().clamp(min=1.0)  # scalar, replicated on every rank
        else:
            self.picked_weight = torch.where(in_shard, position_weights, 0.0)  # [N, K]
            self.counts, self.total = weighted_counts(kept, position_weights)

    def target_sum(self, picked, rows):
        """Σ_k (w_k·) z[y_k] over this shard's targets of the chunk: picked [C, K] → [C]."""
        picked = torch.where(self.in_shard[rows], picked, 0.0)
        if self.picked_weight is not None:
            picked = picked * self.picked_weight[rows]
        return picked.sum(1)

    def onehot(self, rows, scale):
        """The target part of dLoss/dz for the chunk, one value per target: [C, K]."""
        if self.picked_weight is None:
            return self.in_shard[rows].float() * -scale
        return self.picked_weight[rows] * -scale


def _chunk_logits(h, weight, real_cols, buffer):
    """h·Wᵀ written into the reused chunk buffer (fresh 32 MiB blocks would page-fault)."""
    logits = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])  # [C, V_shard]
    if real_cols < weight.shape[0]:
        logits[:, real_cols:] = float("-inf")  # padding gets no mass
    return logits


def _turn_into_grad(exp_logits, tg, rows, scale):
    """In place: exp(z − lse)·counts·scale − scale·(w·)onehot(targets) = dLoss/dz for the chunk."""
    exp_logits.mul_((tg.counts[rows] * scale)[:, None])
    exp_logits.scatter_add_(1, tg.local[rows], tg.onehot(rows, scale))
    return exp_logits


class _PatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, targets, vocab_start, vocab_size, ignore_index, group, needs, pw
    ):
        n, vocab_shard = hidden.shape[0], weight.shape[0]
        real_cols = min(max(vocab_size - vocab_start, 0), vocab_shard)
        tg = _Targets(targets, vocab_start, vocab_shard, ignore_index, pw)
        w32 = _fp32(weight)
        chunk = _rows_per_chunk(n, vocab_shard)
        buffer = torch.empty(chunk, vocab_shard, dtype=torch.float32, device=hidden.device)
        need_h, need_w = needs
        fuse_grad = FUSE_GRAD_IN_FORWARD and group is None and (need_h or need_w)

        row_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        sum_exp = torch.empty_like(row_max)
        target_sum = torch.empty_like(row_max)
        if fuse_grad:
            grad_h = (
                torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
                if need_h
                else None
            )
            grad_w = (
                torch.zeros(vocab_shard, weight.shape[1], dtype=torch.float32, device=weight.device)
                if need_w
                else None
            )
        for a in range(0, n, chunk):
            rows = slice(a, min(a + chunk, n))
            h = _fp32(hidden[rows])  # [C, D]
            z = _chunk_logits(h, w32, real_cols, buffer)  # [C, V_shard]
            target_sum[rows] = tg.target_sum(z.gather(1, tg.local[rows]), rows)
            # A shard of padding only has max -inf: clamp so that exp(z - m) is 0, not NaN.
            m = z.amax(dim=1).clamp_(min=torch.finfo(torch.float32).min)  # [C]
            z.sub_(m[:, None]).exp_()
            s = z.sum(dim=1)
            row_max[rows], sum_exp[rows] = m, s
            if fuse_grad:
                z.div_(s[:, None])  # softmax
                g = _turn_into_grad(z, tg, rows, 1.0 / tg.total)
                if need_h:
                    torch.mm(g, w32, out=grad_h[rows])
                if need_w:
                    grad_w.addmm_(g.t(), h)

        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            packed = torch.stack([sum_exp * torch.exp(row_max - global_max), target_sum])  # [2, N]
            dist.all_reduce(packed, group=group)
            row_max, sum_exp, target_sum = global_max, packed[0], packed[1]
        lse = row_max + torch.log(sum_exp)  # [N]
        loss = ((tg.counts * lse).sum() - target_sum.sum()) / tg.total

        ctx.fused = fuse_grad
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if fuse_grad:
            ctx.grads = (grad_h, grad_w)
        else:
            ctx.save_for_backward(hidden, weight, lse)
            ctx.tg, ctx.real_cols, ctx.group = tg, real_cols, group
        return loss  # fp32 whatever the inputs: a bf16 loss would log to 3 significant digits

    @staticmethod
    def backward(ctx, grad_loss):
        h_dtype, w_dtype = ctx.dtypes
        if ctx.fused:
            grad_h, grad_w = hand_out_stored_gradients(ctx, grad_loss, "torch backend")
            return grad_h, grad_w, None, None, None, None, None, None, None

        hidden, weight, lse = ctx.saved_tensors
        tg, need_h, need_w = ctx.tg, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        w32 = _fp32(weight)
        scale = grad_loss.float() / tg.total
        grad_h = (
            torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
            if need_h
            else None
        )
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        chunk = _rows_per_chunk(n, weight.shape[0])
        buffer = torch.empty(chunk, weight.shape[0], dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk):
            rows = slice(a, min(a + chunk, n))
            h = _fp32(hidden[rows])
            z = _chunk_logits(h, w32, ctx.real_cols, buffer)
            z.sub_(lse[rows, None]).exp_()  # softmax from the global logsumexp
            g = _turn_into_grad(z, tg, rows, scale)
            if need_h:
                torch.mm(g, w32, out=grad_h[rows])
            if need_w:
                grad_w.addmm_(g.t(), h)
        if need_h and ctx.group is not None:
            # hidden is replicated: its gradient is the sum of every shard's part.
            dist.all_reduce(grad_h, group=ctx.group)
        grad_h = None if grad_h is None else grad_h.to(h_dtype)
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


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
    """Chunked multi-target cross-entropy; see the module docstring."""
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return _PatchLoss.apply(
        hidden,
        weight,
        targets,
        vocab_start,
        vocab_size,
        ignore_index,
        group,
        needs,
        position_weights,
    )
