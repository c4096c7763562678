"""The "triton" backend: autograd wrappers around the fused kernels in triton_kernels.py.

patch_loss never materializes the [N, V] logits. How it gets its gradient is BACKWARD
(below). The "atomic" and "gemm" modes run their own logit tiles: the forward streams
vocabulary tiles through an online logsumexp (split over the vocabulary for parallelism,
splits combined here), the backward recomputes them tile by tile. Their target part uses
the identity (1/K)Σ_k z[y_k] = h·mean_k W[y_k]: a gather of K weight rows, never K copies
of h (with position weights, Σ_k w_k·z[y_k] = h·Σ_k w_k·W[y_k], the same gather weighted).
The "recompute" and "in-forward" modes leave all three big products to cuBLAS on bounded
chunks of rows and fuse only the softmax (and its gradient, one-hot part included) in a
row kernel.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton

from megapatch.errors import ConfigError
from megapatch.ops import triton_kernels as kernels
from megapatch.ops._weights import hand_out_stored_gradients, weighted_counts

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


# How the loss gets grad_hidden and grad_weight:
#   "atomic":     Triton logit tiles; the backward recomputes each tile and adds both
#                 products into fp32 accumulators with atomics (no buffer; the atomics
#                 bound its speed);
#   "gemm":       Triton logit tiles; the backward writes the softmax gradient of a chunk
#                 of rows in the input dtype (≤ GRAD_CHUNK_BYTES), cuBLAS the two products;
#   "recompute":  cuBLAS logits of row chunks (≤ CUBLAS_CHUNK_BYTES) and a row kernel for
#                 the softmax statistics; the backward recomputes each chunk's logits, the
#                 row kernel turns them into dLoss/dz in place, cuBLAS the two products
#                 (four products in all, every one in cuBLAS);
#   "in-forward": the same chunks, but the forward turns each into dLoss/dz at once and
#                 does both products (three in all); the backward only scales the stored
#                 gradients. Needs the global softmax statistics inside one chunk, so with
#                 a vocab-parallel group, or without gradients, it runs as "recompute".
# "atomic" is the one measured on a GPU so far (docs/benchmarks.md); bench/gpu_ops.py times
# every mode side by side and the fastest that passes its accuracy check becomes the
# default. MEGAPATCH_LOSS_BACKWARD picks one for a run without code changes.
BACKWARD_MODES = ("atomic", "gemm", "recompute", "in-forward")
BACKWARD = os.environ.get("MEGAPATCH_LOSS_BACKWARD") or "atomic"
GRAD_CHUNK_BYTES = 256 * 2**20
# The cuBLAS modes' chunk: at most this many bytes of logits, and at least CUBLAS_MIN_CHUNKS
# chunks, so the buffer stays a small fraction of the logits the fused loss exists to avoid
# while each chunk's grad_weight update (an fp32 [V, D] read and write) stays rare.
CUBLAS_CHUNK_BYTES = 256 * 2**20
CUBLAS_MIN_CHUNKS = 8
# 16-bit inputs: cuBLAS writes the chunk's logits in fp32 (a separate 16-bit buffer then
# holds dLoss/dz), more accurate softmax at 3x the chunk's bytes; needs torch's out_dtype.
# MEGAPATCH_LOSS_LOGITS_FP32=1 sets it for a run.
LOGITS_FP32 = os.environ.get("MEGAPATCH_LOSS_LOGITS_FP32", "0") not in ("", "0")


def _mode() -> str:
    if BACKWARD not in BACKWARD_MODES:
        raise ConfigError(
            f"triton patch loss mode {BACKWARD!r} (triton_ops.BACKWARD, or the environment's "
            f"MEGAPATCH_LOSS_BACKWARD) is unknown; expected one of {', '.join(BACKWARD_MODES)}"
        )
    return BACKWARD


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


# ----------------------------------------------------------------------------- cuBLAS modes

# Whether torch's out_dtype matmuls (16-bit inputs, fp32 output by cuBLAS) work, per device
# and op: they are CUDA-only, and an older torch refuses an fp32 accumulator in addmm.
_FP32_OUT: dict[tuple, bool] = {}


def _fp32_out(device: torch.device, op: str) -> bool:
    if device.type != "cuda":
        return False
    key = (device.index if device.index is not None else torch.cuda.current_device(), op)
    if key not in _FP32_OUT:
        g = torch.Generator(device="cpu").manual_seed(0)
        a, b = (torch.randn(32, 32, generator=g).to(device, torch.bfloat16) for _ in range(2))
        want = a.float() @ b.float()
        try:
            if op == "mm":
                got = torch.empty(32, 32, device=device)
                torch.mm(a, b, out_dtype=torch.float32, out=got)
            else:
                got = torch.ones(32, 32, device=device)
                torch.addmm(got, a, b, out_dtype=torch.float32, out=got)
                want = want + 1
            ok = got.dtype == torch.float32 and bool(torch.allclose(got, want, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT[key] = ok  # one probe (and host sync) per device and op, ever
    return _FP32_OUT[key]


def _mm_into(out, a, b):
    """out = a @ b by cuBLAS (fp32 accumulation); out may be fp32 for 16-bit a and b."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif _fp32_out(a.device, "mm"):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _addmm_into(acc, a, b):
    """acc += a @ b, acc fp32 while a and b may be 16-bit: the chunks' grad_weight parts are
    summed in fp32, as one [N, V] product would sum them."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _fp32_out(a.device, "addmm"):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        # An older torch: the products of slices (fp32 where mm has out_dtype, else 16-bit),
        # each temporary at most half the bytes of `a`, summed in fp32.
        fp32_mm = _fp32_out(a.device, "mm")
        part_bytes = 4 if fp32_mm else a.element_size()
        step = max(1, a.numel() * a.element_size() // (2 * max(1, b.shape[1]) * part_bytes))
        for s in range(0, acc.shape[0], step):
            rows = a[s : s + step]
            part = torch.mm(rows, b, out_dtype=torch.float32) if fp32_mm else torch.mm(rows, b)
            acc[s : s + step] += part


def _rows_blocks(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":  # the interpreter: tiles small enough that rows span several
        return {"BLOCK_V": 256}
    return {"BLOCK_V": 4096 if dtype != torch.float32 else 2048, "num_warps": 8}


def _cublas_chunk_rows(n: int, cols: int, bytes_per_logit: int) -> int:
    cap = max(1, CUBLAS_CHUNK_BYTES // max(1, cols * bytes_per_logit))
    rows = min(n, cap, triton.cdiv(n, CUBLAS_MIN_CHUNKS))
    if rows > 128:
        rows -= rows % 128  # whole GEMM tiles
    return max(1, rows)


class _Chunks:
    """Row chunks of one [N, cols] logit product, each computed by cuBLAS into a reused buffer.

    Yields (start, end, z, g): z the chunk's logits, g where dLoss/dz goes (z itself unless
    fp32 logits were asked for 16-bit inputs)."""

    def __init__(self, hidden, w_real, with_grad: bool):
        self.hidden, self.w_real = hidden, w_real
        n, cols = hidden.shape[0], w_real.shape[0]
        fp32 = LOGITS_FP32 and hidden.dtype != torch.float32 and _fp32_out(hidden.device, "mm")
        self.z_dtype = torch.float32 if fp32 else hidden.dtype
        per_logit = self.z_dtype.itemsize + (hidden.element_size() if fp32 and with_grad else 0)
        self.rows = _cublas_chunk_rows(n, cols, per_logit)
        shape = (min(self.rows, n), cols)
        self.z = torch.empty(shape, dtype=self.z_dtype, device=hidden.device)
        self.g = torch.empty(shape, dtype=hidden.dtype, device=hidden.device) if fp32 else self.z

    def __iter__(self):
        n = self.hidden.shape[0]
        for start in range(0, n, self.rows):
            end = min(n, start + self.rows)
            z = self.z[: end - start]
            if self.z_dtype == self.hidden.dtype:
                torch.mm(self.hidden[start:end], self.w_real.t(), out=z)
            else:
                torch.mm(self.hidden[start:end], self.w_real.t(), out_dtype=self.z_dtype, out=z)
            yield start, end, z, self.g[: end - start]


def _softmax_rows(z, g, ids, pw, row_start, vocab_start, stats=None, grad=None):
    """The row kernel on one chunk. stats: (max, sum, target) [N] fp32 outputs, or None;
    grad: (coef [N], scale [1], lse [N] or None with stats) to write dLoss/dz into g."""
    c, cols = z.shape
    if c == 0 or (stats is None and cols == 0):
        return
    unused = ids  # a stand-in for pointers the kernel variant never reads
    mx, sm, tgt = stats if stats is not None else (unused,) * 3
    coef, scale, lse = grad if grad is not None else (unused,) * 3
    weighted = pw is not None
    kernels.softmax_rows_kernel[(c,)](
        z, g, ids, pw if weighted else unused, coef, scale, unused if lse is None else lse,
        mx, sm, tgt, row_start, cols, vocab_start,
        K=ids.shape[1], WEIGHTED=weighted, STATS=stats is not None, GRAD=grad is not None,
        **_rows_blocks(z.device, z.dtype),
    )  # fmt: skip


def _cublas_forward(hidden, weight, ids, pw, cols, vocab_start, fuse=None):
    """Softmax statistics of every row [N] fp32 (this shard's max and Σ exp, target logits)
    by chunks; with `fuse` = (need_h, need_w, coef, scale) also dLoss/dz per chunk through
    both products: grad_h [N, D] in the input dtype, grad_w [V_shard, D] fp32 (or None)."""
    n, d = hidden.shape
    w_real = weight[:cols]
    stats = tuple(torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    grad_h = grad_w = grad = None
    if fuse is not None:
        need_h, need_w, coef, scale = fuse
        grad = (coef, scale, None)
        if need_h:
            grad_h = torch.empty(n, d, dtype=hidden.dtype, device=hidden.device)
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start, end, z, g in _Chunks(hidden, w_real, with_grad=fuse is not None):
        _softmax_rows(z, g, ids, pw, start, vocab_start, stats=stats, grad=grad)
        if grad_h is not None:
            torch.mm(g, w_real, out=grad_h[start:end])
        if grad_w is not None:
            _addmm_into(grad_w[:cols], g.t(), hidden[start:end])
    return (*stats, grad_h, grad_w)


def _cublas_backward(hidden, weight, ids, pw, lse, coef, scale, cols, vocab_start, grad_h, grad_w):
    """grad_h[rows] = G·W and grad_w += Gᵀ·h, G = dLoss/dz recomputed one chunk at a time."""
    w_real = weight[:cols]
    for start, end, z, g in _Chunks(hidden, w_real, with_grad=True):
        _softmax_rows(z, g, ids, pw, start, vocab_start, grad=(coef, scale, lse))
        if grad_h is not None:
            _mm_into(grad_h[start:end], g, w_real)
        if grad_w is not None:
            _addmm_into(grad_w[:cols], g.t(), hidden[start:end])


class _PatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, targets, vocab_start, vocab_size, ignore_index, group, pw, needs
    ):
        mode = _mode()  # fixed when the graph is built
        ctx.dtypes = (hidden.dtype, weight.dtype)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)  # tl.dot and cuBLAS want one operand dtype
        kept = targets != ignore_index  # [N, K]
        # Ignored targets become -1, which no shard holds.
        ids = torch.where(kept, targets, -1).contiguous()
        if pw is None:
            counts = kept.sum(dim=1).float()  # [N]
            total = counts.sum().clamp(min=1.0)
        else:
            counts, total = weighted_counts(kept, pw)  # [N] weight scored by each row
        real_cols = min(max(vocab_size - vocab_start, 0), weight.shape[0])

        fused = mode == "in-forward" and group is None and any(needs)
        grads = None
        if mode in ("atomic", "gemm"):
            row_max, sum_exp = _shard_logsumexp(hidden, weight, real_cols)
            # [N, D] Σ_k (w_k·) W[y_k] in shard
            target_rows = gather_sum(ids, weight, 1.0, vocab_start, position_weights=pw)
            target_sum = (hidden.float() * target_rows).sum(dim=1)  # [N] Σ_k (w_k·) z[y_k]
            del target_rows
        else:
            fuse = None
            if fused:
                scale = _scalar(1.0 / total, hidden.device)  # grad_loss comes in backward
                fuse = (needs[0], needs[1], (counts * scale).contiguous(), scale)
            row_max, sum_exp, target_sum, *grads = _cublas_forward(
                hidden, weight, ids, pw, real_cols, vocab_start, fuse
            )
        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            safe_max = torch.where(torch.isinf(global_max), 0.0, global_max)
            packed = torch.stack([sum_exp * torch.exp(row_max - safe_max), target_sum])  # [2, N]
            dist.all_reduce(packed, group=group)
            row_max, sum_exp, target_sum = global_max, packed[0], packed[1]
        lse = row_max + torch.log(sum_exp)  # [N]
        loss = ((counts * lse).sum() - target_sum.sum()) / total

        ctx.backward_mode, ctx.fused = mode, fused
        if fused:
            ctx.grads = grads  # [grad_h or None, grad_w or None], scaled in backward
        else:
            ctx.save_for_backward(hidden, weight, ids, lse, counts, total)
            ctx.vocab_start, ctx.real_cols, ctx.group = vocab_start, real_cols, group
            ctx.position_weights = pw
        return loss  # fp32 whatever the inputs: a bf16 loss would log to 3 significant digits

    @staticmethod
    def backward(ctx, grad_loss):
        h_dtype, w_dtype = ctx.dtypes
        if ctx.fused:
            grad_h, grad_w = hand_out_stored_gradients(ctx, grad_loss, "triton, in-forward mode")
            return grad_h, grad_w, None, None, None, None, None, None, None

        hidden, weight, ids, lse, counts, total = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = hidden.shape
        scale = grad_loss.float() / total  # dLoss/dz per target
        coef = (counts * scale).contiguous()  # [N] dLoss/dlse per row
        pw = ctx.position_weights

        if ctx.backward_mode in ("recompute", "in-forward"):
            # Rows are disjoint between chunks: grad_h needs no accumulator, except to be
            # summed over a group in fp32.
            h_acc = torch.float32 if ctx.group is not None else hidden.dtype
            grad_h = torch.empty(n, d, dtype=h_acc, device=hidden.device) if need_h else None
            grad_w = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                if need_w
                else None
            )
            _cublas_backward(
                hidden, weight, ids, pw, lse, coef, _scalar(scale, hidden.device),
                ctx.real_cols, ctx.vocab_start, grad_h, grad_w,
            )  # fmt: skip
            if need_h and ctx.group is not None:
                dist.all_reduce(grad_h, group=ctx.group)
            grad_h = grad_h.to(h_dtype) if need_h else None
            grad_w = grad_w.to(w_dtype) if need_w else None
            return grad_h, grad_w, None, None, None, None, None, None, None

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
        if need_h:
            gather_sum(ids, weight, -scale, ctx.vocab_start, out=grad_h, position_weights=pw)
            if ctx.group is not None:
                dist.all_reduce(grad_h, group=ctx.group)
        if need_w:
            scatter_add(ids, hidden, grad_w, -scale, ctx.vocab_start, position_weights=pw)
        grad_h = grad_h.to(h_dtype) if need_h else None
        grad_w = grad_w.to(w_dtype) if need_w else None
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
    """Fused multi-target cross-entropy; see the module docstring."""
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
        position_weights,
        needs,
    )
