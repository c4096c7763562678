"""Float64 ground truth and input builders shared by the ops tests."""

from __future__ import annotations

import torch

IGNORE = -100


def loss_truth(
    hidden, weight, targets, vocab_size=None, ignore_index=IGNORE, position_weights=None
):
    """Loss and (grad_hidden, grad_weight) in float64, written independently of the ops.

    position_weights: K numbers (unnormalised) or None; each target counts w_k / Σw in
    both the sum and the normaliser."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    real = (h @ w[:vocab_size].t()).logsumexp(dim=1)  # padding rows excluded outright
    z = h @ w.t()
    kept = targets != ignore_index
    picked = z.gather(1, torch.where(kept, targets, 0))  # [N, K]
    scored = kept.double()  # [N, K] how much each target counts
    if position_weights is not None:
        pw = torch.as_tensor(position_weights, dtype=torch.float64)
        scored = scored * (pw / pw.sum())
    per_target = (real[:, None] - picked) * scored
    norm = scored.sum()
    loss = per_target.sum() / (norm if norm > 0 else 1.0)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def embedding_truth(ids, weight, grad_out):
    w = weight.detach().double().requires_grad_()
    out = w[ids].mean(dim=-2)  # [..., D]
    out.backward(grad_out.double())
    return out.detach(), w.grad


def loss_inputs(n, v, d, k, *, vocab_size=None, ignored=0.2, seed=0):
    """Random hidden/weight/targets with duplicate ids inside patches and ignored targets."""
    g = torch.Generator().manual_seed(seed)
    vocab_size = v if vocab_size is None else vocab_size
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.5
    targets = torch.randint(0, vocab_size, (n, k), generator=g)
    if k > 1:
        targets[::3, 1] = targets[::3, 0]  # duplicate ids inside a patch
    targets[torch.rand(n, k, generator=g) < ignored] = IGNORE
    return hidden, weight, targets


def rel_err(a, b) -> float:
    """Max abs error relative to the largest magnitude of the truth."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
