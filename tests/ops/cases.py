"""Test cases as module-level functions `case(backend, ...) -> errors`, so the same case
runs in-process or in the triton interpreter worker (see conftest.py)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from megapatch.ops import chunked, patch_embedding, patch_loss, reference
from tests.ops.truth import IGNORE, embedding_truth, loss_inputs, loss_truth, rel_err


def init_triton_worker():
    import triton

    assert triton.knobs.runtime.interpret, "the triton worker must start with TRITON_INTERPRET=1"
    torch.set_num_threads(1)


def _weights_tensor(weights):
    return None if weights is None else torch.tensor(weights, dtype=torch.float32)


def loss_errors(
    backend,
    n,
    v,
    d,
    k,
    vocab_size=None,
    ignored=0.2,
    seed=0,
    chunk_rows=None,
    fuse=True,
    weights=None,
):
    """Relative errors (loss, grad_hidden, grad_weight) of patch_loss against float64;
    `weights`: K position weights (a list, unnormalised) or None."""
    hidden, weight, targets = loss_inputs(
        n, v, d, k, vocab_size=vocab_size, ignored=ignored, seed=seed
    )
    if k == 4:
        targets[0] = torch.tensor([0, v - 1 if vocab_size is None else vocab_size - 1, 0, 0])
    saved = chunked.LOGITS_PER_CHUNK, chunked.FUSE_GRAD_IN_FORWARD
    if chunk_rows is not None:  # force many ragged chunks through the torch backend
        chunked.LOGITS_PER_CHUNK, chunked.FUSE_GRAD_IN_FORWARD = v * chunk_rows, fuse
    try:
        want, want_h, want_w = loss_truth(
            hidden, weight, targets, vocab_size, position_weights=weights
        )
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = patch_loss(
            h,
            w,
            targets,
            position_weights=_weights_tensor(weights),
            vocab_size=vocab_size,
            backend=backend,
        )
        loss.backward()
    finally:
        chunked.LOGITS_PER_CHUNK, chunked.FUSE_GRAD_IN_FORWARD = saved
    assert loss.dtype == torch.float32 and loss.dim() == 0
    return {
        "loss": abs(loss.item() - want.item()) / abs(want.item()),
        "grad_hidden": rel_err(h.grad, want_h),
        "grad_weight": rel_err(w.grad, want_w),
    }


def all_ignored(backend, weights=None):
    """(loss, nonzero hidden grads, nonzero weight grads) when no target is scored: every
    target ignored, or with `weights` every target of a positive-weight position ignored."""
    hidden, weight, targets = loss_inputs(40, 100, 16, 2, ignored=0.0)
    if weights is None:
        targets = torch.full((40, 2), IGNORE)
    else:
        targets[:, torch.tensor(weights) > 0] = IGNORE
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = patch_loss(h, w, targets, position_weights=_weights_tensor(weights), backend=backend)
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


def largest_tensor(backend, n=256, v=500, d=16, k=4, weights=None):
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
    modules = [(chunked, "LOGITS_PER_CHUNK", 4096)]
    if backend == "triton":  # the cuBLAS modes' chunks: 4096 fp32 logits too
        from megapatch.ops import triton_ops

        modules.append((triton_ops, "CUBLAS_CHUNK_BYTES", 4096 * 4))
    saved = [getattr(module, name) for module, name, _ in modules]
    for module, name, value in modules:
        setattr(module, name, value)
    try:
        with Largest():
            pw = _weights_tensor(weights)
            patch_loss(h, w, targets, position_weights=pw, backend=backend).backward()
    finally:
        for (module, name, _), value in zip(modules, saved):
            setattr(module, name, value)
    return Largest.nbytes, n * v * 4


def uniform_vs_unweighted(backend, scale):
    """(relative loss difference, max relative grad difference) between explicit uniform
    weights `scale`·ones(K) and position_weights=None."""
    hidden, weight, targets = loss_inputs(90, 250, 24, 4, vocab_size=240, seed=8)
    out = []
    for weights in (None, torch.full((4,), scale)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = patch_loss(h, w, targets, position_weights=weights, vocab_size=240, backend=backend)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    (loss0, h0, w0), (loss1, h1, w1) = out
    return abs(loss1.item() - loss0.item()) / loss0.item(), max(rel_err(h1, h0), rel_err(w1, w0))


def in_mode(backend, mode, case, *args):
    """case(backend, *args) with the Triton loss in `mode` (one of triton_ops.BACKWARD_MODES)."""
    from megapatch.ops import triton_ops

    saved, triton_ops.BACKWARD = triton_ops.BACKWARD, mode
    try:
        return case(backend, *args)
    finally:
        triton_ops.BACKWARD = saved


def loss_errors_with_backward(backend, mode, *args):
    """loss_errors with the Triton loss in `mode`."""
    return in_mode(backend, mode, loss_errors, *args)


def triton_modes(backend):
    from megapatch.ops import triton_ops

    return triton_ops.BACKWARD_MODES


def no_grad_matches_grad(backend, weights=None):
    """|loss under no_grad − loss with gradients| relative, and both relative to float64."""
    hidden, weight, targets = loss_inputs(64, 200, 32, 4, seed=4)
    pw = _weights_tensor(weights)
    want, _, _ = loss_truth(hidden, weight, targets, position_weights=weights)
    with torch.no_grad():
        plain = patch_loss(hidden, weight, targets, position_weights=pw, backend=backend)
    tracked = patch_loss(
        hidden.clone().requires_grad_(), weight, targets, position_weights=pw, backend=backend
    )
    return [abs(x.item() - want.item()) / want.item() for x in (plain, tracked)]


def backward_twice(backend):
    """The error text of a second backward through one patch_loss, or None if it worked."""
    hidden, weight, targets = loss_inputs(40, 100, 16, 2, seed=1)
    h = hidden.requires_grad_()
    loss = patch_loss(h, weight, targets, backend=backend)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
    except RuntimeError as exc:
        return str(exc)
    return None


def unknown_mode(backend):
    """The ConfigError text for an unknown Triton loss mode."""
    from megapatch.errors import ConfigError

    hidden, weight, targets = loss_inputs(8, 20, 4, 2, seed=1)
    try:
        in_mode(backend, "fast", lambda b: patch_loss(hidden, weight, targets, backend=b))
    except ConfigError as exc:
        return str(exc)
    return None


def fp32_accumulation_of_16bit_products(backend):
    """Relative errors against float64 of the cuBLAS modes' fp32 grad_weight accumulation
    (acc += a @ b, a and b bf16) and of their fp32-out product, through whichever path
    this torch and device take (on the CPU: bf16 products of slices, summed in fp32)."""
    from megapatch.ops import triton_ops

    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, 40, generator=g).bfloat16()
    b = torch.randn(40, 24, generator=g).bfloat16()
    acc = torch.randn(300, 24, generator=g)
    want = acc.double() + a.double() @ b.double()
    triton_ops._addmm_into(acc, a, b)
    out = torch.empty(300, 24)
    triton_ops._mm_into(out, a, b)
    return rel_err(acc, want), rel_err(out, a.double() @ b.double())


def cublas_chunk_rows(backend, n, cols, bytes_per_logit):
    from megapatch.ops import triton_ops

    return triton_ops._cublas_chunk_rows(n, cols, bytes_per_logit)


# The last commit before position weights existed: position_weights=None must still
# compute exactly what the ops computed there. A deliberate change to the unweighted
# arithmetic moves this pin (and says so in its commit).
PINNED_COMMIT = "56fe1dc0333857e32b6852a7afdab0ee1344b6d4"
_PINNED_FILES = {
    "reference": ["reference"],
    "torch": ["chunked"],
    "triton": ["triton_kernels", "triton_ops"],
}


@functools.cache
def _pinned_backend(backend):
    """The backend module as it was at PINNED_COMMIT, or a string saying why it can't be read."""
    root = Path(__file__).resolve().parents[2]
    folder = Path(tempfile.mkdtemp(prefix="pinned-ops-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    modules = {}
    for name in _PINNED_FILES[backend]:
        shown = subprocess.run(
            ["git", "show", f"{PINNED_COMMIT}:megapatch/ops/{name}.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode != 0:
            return f"git cannot show {PINNED_COMMIT[:12]}: {shown.stderr.strip()[:200]}"
        # A real file, not exec'd text: triton.jit reads each kernel's source from its file.
        path = folder / f"pinned_{name}.py"
        path.write_text(shown.stdout)
        spec = importlib.util.spec_from_file_location(f"pinned_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    if backend == "triton":
        modules["triton_ops"].kernels = modules["triton_kernels"]  # not today's kernels
    return modules[_PINNED_FILES[backend][-1]]


def unweighted_matches_pinned(backend, variant):
    """Whether patch_loss(position_weights=None) gives bit for bit the loss and gradients
    of the code at PINNED_COMMIT; a string when that code can't be read here. `variant`:
    torch "fused"/"recompute" (in chunks of 50 rows), triton "atomic"/"gemm", else None."""
    old = _pinned_backend(backend)
    if isinstance(old, str):
        return old
    new = {"reference": reference, "torch": chunked}.get(backend)
    if new is None:
        from megapatch.ops import triton_ops as new
    hidden, weight, targets = loss_inputs(252, 507, 123, 4, vocab_size=500, seed=2)
    knobs = {}
    if backend == "torch":
        knobs = {"LOGITS_PER_CHUNK": 507 * 50, "FUSE_GRAD_IN_FORWARD": variant == "fused"}
    elif backend == "triton":
        knobs = {"BACKWARD": variant}
    results = []
    for module, through_api in ((old, False), (new, True)):
        saved = {name: getattr(module, name) for name in knobs}
        for name, value in knobs.items():
            setattr(module, name, value)
        try:
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            if through_api:
                loss = patch_loss(h, w, targets, vocab_size=500, backend=backend)
            else:  # what the API at the pin handed the backend
                loss = module.patch_loss(h, w, targets, vocab_start=0, vocab_size=500)
            loss.backward()
        finally:
            for name, value in saved.items():
                setattr(module, name, value)
        results.append((loss.detach(), h.grad, w.grad))
    return all(torch.equal(a, b) for a, b in zip(*results))
