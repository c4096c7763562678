"""patch_loss, every backend, against a float64 ground truth."""

import pytest
import torch

from megapatch.ops import chunked, patch_loss
from tests.ops.truth import IGNORE, loss_inputs, loss_truth, rel_err

ALL = ["reference", "torch", "triton"]


def _check(backend, hidden, weight, targets, vocab_size=None):
    want, want_h, want_w = loss_truth(hidden, weight, targets, vocab_size)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = patch_loss(h, w, targets, vocab_size=vocab_size, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    assert rel_err(h.grad, want_h) <= 1e-5
    assert rel_err(w.grad, want_w) <= 1e-5


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_odd_shapes_padded_vocab_ignored_targets(backend, k):
    # N=252, V=507, D=123; the last 7 weight rows are padding; 20% of targets ignored.
    hidden, weight, targets = loss_inputs(252, 507, 123, k, vocab_size=500, seed=k)
    _check(backend, hidden, weight, targets, vocab_size=500)


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_unpadded_vocab_no_ignored(backend):
    hidden, weight, targets = loss_inputs(70, 300, 48, 4, ignored=0.0, seed=1)
    targets[0] = torch.tensor([0, 299, 299, 0])  # first and last vocabulary rows
    _check(backend, hidden, weight, targets)


@pytest.mark.parametrize("fuse", [True, False], ids=["grads-in-forward", "recompute"])
def test_torch_many_ragged_chunks(monkeypatch, fuse):
    # Small chunks: 252 rows run as five chunks of 50 and one of 2.
    monkeypatch.setattr(chunked, "LOGITS_PER_CHUNK", 507 * 50)
    monkeypatch.setattr(chunked, "FUSE_GRAD_IN_FORWARD", fuse)
    hidden, weight, targets = loss_inputs(252, 507, 123, 4, vocab_size=500, seed=7)
    _check("torch", hidden, weight, targets, vocab_size=500)


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_all_targets_ignored_gives_zero_loss_and_grads(backend):
    hidden, weight, _ = loss_inputs(40, 100, 16, 2)
    targets = torch.full((40, 2), IGNORE)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = patch_loss(h, w, targets, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_custom_ignore_index_and_frozen_weight(backend):
    hidden, weight, targets = loss_inputs(50, 120, 24, 4, ignored=0.0, seed=3)
    targets[torch.rand(50, 4, generator=torch.Generator().manual_seed(0)) < 0.3] = -1
    want, want_h, _ = loss_truth(hidden, weight, targets, ignore_index=-1)
    h = hidden.clone().requires_grad_()
    loss = patch_loss(h, weight, targets, ignore_index=-1, backend=backend)
    loss.backward()
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    assert rel_err(h.grad, want_h) <= 1e-5
    assert weight.grad is None


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_grad_matches_grad_mode(backend):
    hidden, weight, targets = loss_inputs(64, 200, 32, 4, seed=4)
    with torch.no_grad():
        plain = patch_loss(hidden, weight, targets, backend=backend)
    tracked = patch_loss(hidden.requires_grad_(), weight, targets, backend=backend)
    assert plain.item() == pytest.approx(tracked.item(), rel=1e-6)


def test_k1_is_cross_entropy():
    hidden, weight, targets = loss_inputs(64, 200, 32, 1, seed=5)
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets[:, 0])
    for backend in ("reference", "torch"):
        got = patch_loss(hidden, weight, targets, backend=backend)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bf16_inputs_accumulate_in_fp32(backend):
    hidden, weight, targets = loss_inputs(96, 300, 64, 4, seed=6)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    # The truth on exactly the bf16 values: only accumulation error remains.
    want, want_h, want_w = loss_truth(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = patch_loss(h, w, targets, backend=backend)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert abs(loss.float().item() - want.item()) <= 1e-2 * want.item()  # the bf16 output
    assert rel_err(h.grad, want_h) <= 1e-2 and rel_err(w.grad, want_w) <= 1e-2
