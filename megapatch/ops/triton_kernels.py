"""Triton kernels for the patch ops. Launch wrappers live in triton_ops.py.

Everything accumulates in fp32 whatever the input dtype. Shard-aware throughout: a row
of the weight is addressed by `id - vocab_start` and ids outside [0, V_shard) after that
shift contribute nothing, so the same kernels serve the plain and the vocab-parallel ops.

Import this module only after deciding on the interpreter: triton reads TRITON_INTERPRET
when a kernel is decorated, i.e. at import time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_sum_kernel(
    ids_ptr,  # [M, K] int, global ids; anything outside the shard is skipped
    weight_ptr,  # [V_shard, D]
    out_ptr,  # [M, D]
    scale_ptr,  # [1] fp32: out = scale · Σ_k (w_k ·) W[ids_k] (+ out when ACCUMULATE)
    kweights_ptr,  # [K] fp32 position weights w_k, read only when WEIGHTED
    M,
    D,
    vocab_start,
    vocab_shard,
    K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < M
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        ids = tl.load(ids_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=-1)
        local = ids.to(tl.int64) - vocab_start
        ok = row_ok & (local >= 0) & (local < vocab_shard)
        w = tl.load(
            weight_ptr + local[:, None] * D + cols[None, :],
            mask=ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if WEIGHTED:
            acc += w.to(tl.float32) * tl.load(kweights_ptr + k)
        else:
            acc += w.to(tl.float32)
    acc = acc * tl.load(scale_ptr)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def scatter_add_kernel(
    ids_ptr,  # [M, K] int, global ids; anything outside the shard is skipped
    src_ptr,  # [M, D]
    grad_weight_ptr,  # [V_shard, D] fp32, accumulated atomically
    scale_ptr,  # [1] fp32: grad_weight[ids_k] += scale · (w_k ·) src for every k
    kweights_ptr,  # [K] fp32 position weights w_k, read only when WEIGHTED
    M,
    D,
    vocab_start,
    vocab_shard,
    K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    src = tl.load(
        src_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    src = src * tl.load(scale_ptr)  # [BLOCK_M, BLOCK_D]
    for k in tl.static_range(K):
        ids = tl.load(ids_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=-1)
        local = ids.to(tl.int64) - vocab_start
        ok = row_ok & (local >= 0) & (local < vocab_shard)
        if WEIGHTED:
            part = src * tl.load(kweights_ptr + k)
        else:
            part = src
        tl.atomic_add(
            grad_weight_ptr + local[:, None] * D + cols[None, :],
            part,
            mask=ok[:, None] & col_ok[None, :],
            sem="relaxed",  # a pure sum: no ordering needed, and relaxed is much cheaper
        )


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    rows,
    cols,
    N,
    D,
    real_cols,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """z = h[rows] · W[cols]ᵀ in fp32, padding and out-of-range columns at -inf. [BLOCK_N, BLOCK_V]"""
    row_ok = rows < N
    col_ok = cols < real_cols
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(
            hidden_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        w = tl.load(
            weight_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_V, BLOCK_D]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def logsumexp_forward_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V_shard, D]
    max_ptr,  # [SPLITS, N] fp32: running max of each row over this split's columns
    sum_ptr,  # [SPLITS, N] fp32: Σ exp(z − max) over this split's columns
    N,
    D,
    real_cols,  # columns at or past this index are padding (or past the shard)
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online logsumexp over a range of vocabulary tiles; the logits never leave the chip."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(
            hidden_ptr,
            weight_ptr,
            rows,
            cols,
            N,
            D,
            real_cols,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            PRECISION,
        )
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # A row with no real column yet keeps max = -inf; shift by 0 there to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        run_max = new_max
    row_ok = rows < N
    tl.store(max_ptr + split * N + rows, run_max, mask=row_ok)
    tl.store(sum_ptr + split * N + rows, run_sum, mask=row_ok)


@triton.jit
def softmax_backward_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V_shard, D]
    lse_ptr,  # [N] fp32, the global logsumexp of each row
    coef_ptr,  # [N] fp32, dLoss/dlse of each row: grad · count_i / total
    grad_hidden_ptr,  # [N, D] fp32, accumulated atomically
    grad_weight_ptr,  # [V_shard, D] fp32, accumulated atomically
    N,
    D,
    real_cols,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
):
    """The softmax part of dLoss/dz, recomputed tile by tile and pushed through both matmuls.

    The target (one-hot) part is a gather/scatter of K rows and is done by the kernels above.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    z = _logits_tile(
        hidden_ptr, weight_ptr, rows, cols, N, D, real_cols, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION
    )
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    grad_z = tl.exp(z - lse[:, None]) * coef[:, None]  # [BLOCK_N, BLOCK_V]
    grad_z = grad_z.to(hidden_ptr.dtype.element_ty)
    col_ok = cols < real_cols
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        if GRAD_HIDDEN:
            w = tl.load(
                weight_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BLOCK_V, BLOCK_D]
            part = tl.dot(grad_z, w, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(
                grad_hidden_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :],
                part,
                mask=row_ok[:, None] & d_ok[None, :],
                sem="relaxed",
            )
        if GRAD_WEIGHT:
            h = tl.load(
                hidden_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            part = tl.dot(tl.trans(grad_z), h, input_precision=PRECISION)  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(
                grad_weight_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :],
                part,
                mask=col_ok[:, None] & d_ok[None, :],
                sem="relaxed",
            )


@triton.jit
def softmax_grad_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V_shard, D]
    lse_ptr,  # [N] fp32, the global logsumexp of each row
    coef_ptr,  # [N] fp32, dLoss/dlse of each row
    out_ptr,  # [row_end - row_start, V_shard] in the input dtype: the softmax part of dLoss/dz
    row_start,
    row_end,
    D,
    real_cols,
    out_cols,  # V_shard: the row stride of out (padding columns get 0)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """exp(z − lse) · coef for a chunk of rows, z recomputed in fp32 tile by tile; the two
    products that turn it into grad_hidden and grad_weight are left to cuBLAS."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = row_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < row_end
    z = _logits_tile(
        hidden_ptr, weight_ptr, rows, cols, row_end, D, real_cols, BLOCK_N, BLOCK_V, BLOCK_D,
        PRECISION,
    )  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    grad_z = tl.exp(z - lse[:, None]) * coef[:, None]  # [BLOCK_N, BLOCK_V]; 0 in padding
    out = out_ptr + (rows - row_start).to(tl.int64)[:, None] * out_cols + cols[None, :]
    tl.store(
        out,
        grad_z.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (cols < out_cols)[None, :],
    )


@triton.jit
def softmax_rows_kernel(
    z_ptr,  # [C, cols] logits of a chunk of rows (cuBLAS wrote them), any float dtype
    g_ptr,  # [C, cols] out when GRAD: dLoss/dz in its own dtype; may be z_ptr (in place)
    ids_ptr,  # [N, K] global target ids, -1 where ignored
    kweights_ptr,  # [K] fp32 position weights w_k, read only when WEIGHTED
    coef_ptr,  # [N] fp32 dLoss/dlse of each row, read when GRAD
    scale_ptr,  # [1] fp32 dLoss/dz[y] of one unit-weight target, negated here; GRAD
    lse_ptr,  # [N] fp32 the global logsumexp, read when GRAD without STATS
    max_ptr,  # [N] fp32, written when STATS: the row's max over this shard's columns
    sum_ptr,  # [N] fp32, written when STATS: Σ exp(z − max) over them
    target_ptr,  # [N] fp32, written when STATS: Σ_k (w_k·) z[y_k] over in-shard targets
    row_start,  # the chunk's first row: the row index into ids, coef and the [N] outputs
    cols,  # real (unpadded) columns of this shard: the width of z and g
    vocab_start,
    K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    STATS: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of a chunk whose logits cuBLAS already computed: the memory-bound
    softmax part of the loss, so the three big products all stay in cuBLAS.

    STATS: one pass for the row's max, Σ exp and target logits. GRAD: one more pass writing
    exp(z − lse)·coef − scale·Σ_k (w_k·)[col = y_k], i.e. the whole dLoss/dz of the row
    (the one-hot part included, so the two products need no gather/scatter afterwards);
    with STATS the lse is this row's own (single shard), else it is read from lse_ptr.
    """
    pid = tl.program_id(0)
    row = (row_start + pid).to(tl.int64)
    z_row = z_ptr + pid.to(tl.int64) * cols
    offs = tl.arange(0, BLOCK_V)
    if STATS:
        run_max = float("-inf")
        run_sum = 0.0
        for c0 in range(0, cols, BLOCK_V):
            cs = c0 + offs
            z = tl.load(z_row + cs, mask=cs < cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            # No real column seen yet: max stays -inf; shift by 0 to avoid inf - inf.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
            run_max = new_max
        tl.store(max_ptr + row, run_max)
        tl.store(sum_ptr + row, run_sum)
        target = 0.0
        for k in tl.static_range(K):
            local = tl.load(ids_ptr + row * K + k) - vocab_start
            ok = (local >= 0) & (local < cols)
            picked = tl.load(z_row + local, mask=ok, other=0.0).to(tl.float32)
            if WEIGHTED:
                picked = picked * tl.load(kweights_ptr + k)
            target += picked
        tl.store(target_ptr + row, target)
        lse = run_max + tl.log(run_sum)
    else:
        lse = tl.load(lse_ptr + row)
    if GRAD:
        if STATS:
            # In place, a thread may overwrite the target logit another has yet to read.
            tl.debug_barrier()
        coef = tl.load(coef_ptr + row)
        scale = tl.load(scale_ptr)
        g_row = g_ptr + pid.to(tl.int64) * cols
        for c0 in range(0, cols, BLOCK_V):
            cs = c0 + offs
            in_row = cs < cols
            z = tl.load(z_row + cs, mask=in_row, other=float("-inf")).to(tl.float32)
            g = tl.exp(z - lse) * coef
            for k in tl.static_range(K):
                # Ignored (-1) and other shards' targets never equal a column here.
                local = tl.load(ids_ptr + row * K + k) - vocab_start
                unit = scale
                if WEIGHTED:
                    unit = scale * tl.load(kweights_ptr + k)
                g = tl.where(cs == local, g - unit, g)  # a duplicate id subtracts twice
            tl.store(g_row + cs, g.to(g_ptr.dtype.element_ty), mask=in_row)
