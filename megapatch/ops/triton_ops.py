"""The "triton" backend: autograd wrappers around the fused kernels in triton_kernels.py.

patch_loss never materializes logits: the forward streams vocabulary tiles through an
online logsumexp (split over the vocabulary for parallelism, splits combined here), the
backward recomputes the logits tile by tile and turns their softmax gradient into
grad_hidden and grad_weight (see BACKWARD below). The target part uses the identity
(1/K)Σ_k z[y_k] = h·mean_k W[y_k]: a gather of K weight rows, never K copies of h
(with position weights, Σ_k w_k·z[y_k] = h·Σ_k w_k·W[y_k], the same gather weighted).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton

from megapatch.ops import triton_kernels as kernels
from megapatch.ops._weights import weighted_counts

# Streaming multiprocessors, cached per device: sets how far the forward splits the vocabulary.
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one; few splits keep it quick
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _loss_blocks(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":  # the interpreter: few large blocks, numpy does the rest
        return {"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 128}
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}


def _gather_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"BLOCK_M": 256, "BLOCK_D": 128}
    return {"BLOCK_M": 16, "BLOCK_D": 128, "num_warps": 4}


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (the oracle tests demand it); 16-bit inputs use
    # the tensor cores natively with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _scalar(value, device) -> torch.Tensor:
    """A one-element fp32 tensor: kernels read scales from memory, so no host sync."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def gather_sum(
    ids, weight, scale, vocab_start, out=None, out_dtype=torch.float32, position_weights=None
):
    """scale · Σ_k (w_k ·) weight[ids[:, k] − vocab_start] (in-shard ids only); adds into
    `out` if given. position_weights: [K] fp32 w_k, or None for no weighting."""
    m, k = ids.shape
    d = weight.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, d, dtype=out_dtype, device=weight.device)
    blocks = _gather_blocks(weight.device)
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(d, blocks["BLOCK_D"]))
    scale = _scalar(scale, weight.device)
    weighted = position_weights is not None
    kweights = position_weights.contiguous() if weighted else scale  # unread stand-in
    kernels.gather_sum_kernel[grid](
        ids, weight, out, scale, kweights, m, d, vocab_start, weight.shape[0],
        K=k, ACCUMULATE=accumulate, WEIGHTED=weighted, **blocks,
    )  # fmt: skip
    return out


def scatter_add(ids, src, grad_weight, scale, vocab_start, position_weights=None):
    """grad_weight[ids[:, k] − vocab_start] += scale · (w_k ·) src for every k (in-shard ids
    only). position_weights: [K] fp32 w_k, or None for no weighting."""
    m, k = ids.shape
    d = src.shape[1]
    blocks = _gather_blocks(src.device)
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(d, blocks["BLOCK_D"]))
    scale = _scalar(scale, src.device)
    weighted = position_weights is not None
    kweights = position_weights.contiguous() if weighted else scale  # unread stand-in
    kernels.scatter_add_kernel[grid](
        ids, src, grad_weight, scale, kweights, m, d, vocab_start, grad_weight.shape[0],
        K=k, WEIGHTED=weighted, **blocks,
    )  # fmt: skip
    return grad_weight


# ----------------------------------------------------------------------------- embedding


class _PatchEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, vocab_start, group):
        ids, weight = ids.contiguous(), weight.contiguous()
        k = ids.shape[1]
        sharded = group is not None
        # A sharded output is all-reduced: keep it fp32 until then.
        out_dtype = torch.float32 if sharded else weight.dtype
        out = gather_sum(ids, weight, 1.0 / k, vocab_start, out_dtype=out_dtype)  # [M, D]
        if sharded:
            dist.all_reduce(out, group=group)
            out = out.to(weight.dtype)
        ctx.save_for_backward(ids)
        ctx.vocab_start, ctx.shape, ctx.dtype = vocab_start, weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad_weight = torch.zeros(ctx.shape, dtype=torch.float32, device=grad_out.device)
        scatter_add(ids, grad_out.contiguous(), grad_weight, 1.0 / ids.shape[1], ctx.vocab_start)
        return None, grad_weight.to(ctx.dtype), None, None


def patch_embedding(ids, weight, *, vocab_start=0, group=None):
    """ids [M, K] (global), weight [V_shard, D] → [M, D], mean of the K rows."""
    return _PatchEmbedding.apply(ids, weight, vocab_start, group)


# ----------------------------------------------------------------------------- loss


def _shard_logsumexp(hidden, weight, real_cols):
    """Per-row max and Σ exp(z − max) over this shard's real columns. → [N], [N] fp32"""
    n, d = hidden.shape
    blocks = _loss_blocks(hidden.device, hidden.dtype)
    row_blocks = triton.cdiv(n, blocks["BLOCK_N"])
    vocab_tiles = max(1, triton.cdiv(real_cols, blocks["BLOCK_V"]))
    # Enough programs to fill the device: split the vocabulary when rows alone are too few.
    splits = min(vocab_tiles, max(1, triton.cdiv(4 * _sm_count(hidden.device), row_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)
    part_max = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    kernels.logsumexp_forward_kernel[(row_blocks, splits)](
        hidden, weight, part_max, part_sum, n, d, real_cols, tiles_per_split,
        PRECISION=_precision(hidden.dtype), **blocks,
    )  # fmt: skip
    row_max = part_max.amax(dim=0)  # [N]
    safe_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    sum_exp = (part_sum * torch.exp(part_max - safe_max)).sum(dim=0)
    return row_max, sum_exp


# How the backward turns the softmax gradient into grad_hidden and grad_weight:
#   "atomic": one kernel recomputes each logit tile and adds both products into fp32
#             accumulators with atomics (no buffer; the atomics bound its speed);
#   "gemm":   a kernel writes the softmax gradient of a chunk of rows in the input dtype
#             (≤ GRAD_CHUNK_BYTES) and cuBLAS does the two products.
# "atomic" is the one measured on a GPU so far (docs/benchmarks.md); bench/gpu_ops.py times
# both side by side, and the faster one should become the default.
BACKWARD = "atomic"
GRAD_CHUNK_BYTES = 256 * 2**20


def _softmax_backward_by_chunks(hidden, weight, lse, coef, grad_h, grad_w, real_cols):
    """grad_h += G·W and grad_w += Gᵀ·h, G = exp(z − lse)·coef, one chunk of rows at a time."""
    n, d = hidden.shape
    cols = weight.shape[0]
    blocks = _loss_blocks(hidden.device, hidden.dtype)
    # At most GRAD_CHUNK_BYTES, and at most 1/16 of the rows: the buffer stays a small
    # fraction of the [N, V] logits the fused loss exists to avoid.
    cap = max(1, GRAD_CHUNK_BYTES // (cols * hidden.element_size()))
    rows_per_chunk = max(1, min(cap, triton.cdiv(n, 16)))
    buffer = torch.empty(rows_per_chunk, cols, dtype=hidden.dtype, device=hidden.device)
    need_h, need_w = grad_h.shape[0] == n, grad_w.shape[0] == cols
    for start in range(0, n, rows_per_chunk):
        end = min(n, start + rows_per_chunk)
        grad_z = buffer[: end - start]
        grid = (triton.cdiv(end - start, blocks["BLOCK_N"]), triton.cdiv(cols, blocks["BLOCK_V"]))
        kernels.softmax_grad_kernel[grid](
            hidden, weight, lse, coef, grad_z, start, end, d, real_cols, cols,
            PRECISION=_precision(hidden.dtype), **blocks,
        )  # fmt: skip
        if need_h:
            grad_h[start:end] += torch.mm(grad_z, weight)
        if need_w:
            grad_w += torch.mm(grad_z.t(), hidden[start:end])


class _PatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, vocab_size, ignore_index, group, pw):
        ctx.dtypes = (hidden.dtype, weight.dtype)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)  # tl.dot wants one operand dtype
        kept = targets != ignore_index  # [N, K]
        # Ignored targets become -1, which no shard holds.
        ids = torch.where(kept, targets, -1).contiguous()
        if pw is None:
            counts = kept.sum(dim=1).float()  # [N]
            total = counts.sum().clamp(min=1.0)
        else:
            counts, total = weighted_counts(kept, pw)  # [N] weight scored by each row
        real_cols = min(max(vocab_size - vocab_start, 0), weight.shape[0])

        row_max, sum_exp = _shard_logsumexp(hidden, weight, real_cols)
        # [N, D] Σ_k (w_k·) W[y_k] in shard
        target_rows = gather_sum(ids, weight, 1.0, vocab_start, position_weights=pw)
        target_sum = (hidden.float() * target_rows).sum(dim=1)  # [N] Σ_k (w_k·) z[y_k]
        del target_rows
        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            safe_max = torch.where(torch.isinf(global_max), 0.0, global_max)
            packed = torch.stack([sum_exp * torch.exp(row_max - safe_max), target_sum])  # [2, N]
            dist.all_reduce(packed, group=group)
            row_max, sum_exp, target_sum = global_max, packed[0], packed[1]
        lse = row_max + torch.log(sum_exp)  # [N]
        loss = ((counts * lse).sum() - target_sum.sum()) / total

        ctx.save_for_backward(hidden, weight, ids, lse, counts, total)
        ctx.vocab_start, ctx.real_cols, ctx.group = vocab_start, real_cols, group
        ctx.position_weights = pw
        ctx.backward_mode = BACKWARD  # fixed when the graph is built
        return loss  # fp32 whatever the inputs: a bf16 loss would log to 3 significant digits

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, ids, lse, counts, total = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = hidden.shape
        scale = grad_loss.float() / total  # dLoss/dz per target
        coef = (counts * scale).contiguous()  # [N] dLoss/dlse per row

        # fp32 accumulators; an unneeded one is a 1-element stand-in the kernel never touches.
        grad_h = torch.zeros(n if need_h else 1, d, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(
            weight.shape if need_w else (1, d), dtype=torch.float32, device=weight.device
        )
        if ctx.backward_mode == "gemm":
            _softmax_backward_by_chunks(hidden, weight, lse, coef, grad_h, grad_w, ctx.real_cols)
        else:
            blocks = _loss_blocks(hidden.device, hidden.dtype)
            grid = (
                triton.cdiv(n, blocks["BLOCK_N"]),
                max(1, triton.cdiv(ctx.real_cols, blocks["BLOCK_V"])),
            )
            kernels.softmax_backward_kernel[grid](
                hidden, weight, lse, coef, grad_h, grad_w, n, d, ctx.real_cols,
                PRECISION=_precision(hidden.dtype), GRAD_HIDDEN=need_h, GRAD_WEIGHT=need_w,
                **blocks,
            )  # fmt: skip
        # The one-hot part: −scale·Σ_k (w_k·) W[y_k] into grad_h, −scale·(w_k·) h into the
        # target rows of grad_w.
        pw = ctx.position_weights
        if need_h:
            gather_sum(ids, weight, -scale, ctx.vocab_start, out=grad_h, position_weights=pw)
            if ctx.group is not None:
                dist.all_reduce(grad_h, group=ctx.group)
        if need_w:
            scatter_add(ids, hidden, grad_w, -scale, ctx.vocab_start, position_weights=pw)
        h_dtype, w_dtype = ctx.dtypes
        grad_h = grad_h.to(h_dtype) if need_h else None
        grad_w = grad_w.to(w_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None, None


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
    """Fused multi-target cross-entropy; see the module docstring."""
    return _PatchLoss.apply(
        hidden, weight, targets, vocab_start, vocab_size, ignore_index, group, position_weights
    )
