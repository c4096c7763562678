"""Test cases as module-level functions `case(backend, ...) -> errors`, so the same case
runs in-process or in the triton interpreter worker (see conftest.py)."""

from __future__ import annotations

import torch

from megapatch.ops import chunked, patch_embedding, patch_loss
from tests.ops.truth import IGNORE, embedding_truth, loss_inputs, loss_truth, rel_err


def init_triton_worker():
    import triton

    assert triton.knobs.runtime.interpret, "the triton worker must start with TRITON_INTERPRET=1"
    torch.set_num_threads(1)


def loss_errors(
    backend, n, v, d, k, vocab_size=None, ignored=0.2, seed=0, chunk_rows=None, fuse=True
):
    """Relative errors (loss, grad_hidden, grad_weight) of patch_loss against float64."""
    hidden, weight, targets = loss_inputs(
        n, v, d, k, vocab_size=vocab_size, ignored=ignored, seed=seed
    )
    if k == 4:
        targets[0] = torch.tensor([0, v - 1 if vocab_size is None else vocab_size - 1, 0, 0])
    saved = chunked.LOGITS_PER_CHUNK, chunked.FUSE_GRAD_IN_FORWARD
    if chunk_rows is not None:  # force many ragged chunks through the torch backend
        chunked.LOGITS_PER_CHUNK, chunked.FUSE_GRAD_IN_FORWARD = v * chunk_rows, fuse
    try:
        want, want_h, want_w = loss_truth(hidden, weight, targets, vocab_size)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = patch_loss(h, w, targets, vocab_size=vocab_size, backend=backend)
        loss.backward()
    finally:
        chunked.LOGITS_PER_CHUNK, chunked.FUSE_GRAD_IN_FORWARD = saved
    assert loss.dtype == torch.float32 and loss.dim() == 0
    return {
        "loss": abs(loss.item() - want.item()) / abs(want.item()),
        "grad_hidden": rel_err(h.grad, want_h),
        "grad_weight": rel_err(w.grad, want_w),
    }


def all_ignored(backend):
    """(loss, nonzero hidden grads, nonzero weight grads) when every target is ignored."""
    hidden, weight, _ = loss_inputs(40, 100, 16, 2)
    targets = torch.full((40, 2), IGNORE)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = patch_loss(h, w, targets, backend=backend)
    loss.backward()
    return loss.item(), int(torch.count_nonzero(h.grad)), int(torch.count_nonzero(w.grad))


def custom_ignore_frozen_weight(backend):
    """ignore_index=-1 and a weight without grad: (loss err, grad_hidden err, weight.grad)."""
    hidden, weight, targets = loss_inputs(50, 120, 24, 4, ignored=0.0, seed=3)
    targets[torch.rand(50, 4, generator=torch.Generator().manual_seed(0)) < 0.3] = -1
    want, want_h, _ = loss_truth(hidden, weight, targets, ignore_index=-1)
    h = hidden.clone().requires_grad_()
    loss = patch_loss(h, weight, targets, ignore_index=-1, backend=backend)
    loss.backward()
    return abs(loss.item() - want.item()) / want.item(), rel_err(h.grad, want_h), weight.grad


def embedding_errors(backend, k, seed=0):
    """Relative errors (output, grad_weight) of patch_embedding against float64."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(507, 123, generator=g)
    ids = torch.randint(0, 507, (3, 84, k), generator=g)  # [B, L, K]
    if k > 1:
        ids[:, ::4, 1] = ids[:, ::4, 0]  # duplicate ids inside a patch
    ids[0, 0], ids[0, 1] = 0, 506  # first and last rows
    grad_out = torch.randn(3, 84, 123, generator=g)
    want, want_grad = embedding_truth(ids, weight, grad_out)
    w = weight.clone().requires_grad_()
    out = patch_embedding(ids, w, backend=backend)
    out.backward(grad_out)
    assert out.shape == (3, 84, 123) and out.dtype == torch.float32
    return {"out": rel_err(out, want), "grad_weight": rel_err(w.grad, want_grad)}


def largest_tensor(backend, n=256, v=500, d=16, k=4):
    """Bytes of the largest tensor any op produces during patch_loss forward+backward, with
    chunks limited to 4096 logits; and the bytes of [N, V] fp32 logits for comparison."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.numel() * t.element_size())
            return out

    hidden, weight, targets = loss_inputs(n, v, d, k, seed=9)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    saved = chunked.LOGITS_PER_CHUNK
    chunked.LOGITS_PER_CHUNK = 4096
    try:
        with Largest():
            patch_loss(h, w, targets, backend=backend).backward()
    finally:
        chunked.LOGITS_PER_CHUNK = saved
    return Largest.nbytes, n * v * 4


def loss_errors_with_backward(backend, mode, *args):
    """loss_errors with the Triton loss's backward in `mode` ("gemm" or "atomic")."""
    from megapatch.ops import triton_ops

    saved, triton_ops.BACKWARD = triton_ops.BACKWARD, mode
    try:
        return loss_errors(backend, *args)
    finally:
        triton_ops.BACKWARD = saved
