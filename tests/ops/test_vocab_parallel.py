"""Vocab-parallel ops with real gloo processes equal the single-process ops (float64 truth)."""

import pytest
import torch

from megapatch.ops import vocab_parallel_patch_embedding, vocab_parallel_patch_loss
from tests.distributed import run_distributed
from tests.ops.truth import embedding_truth, loss_inputs, loss_truth, rel_err

BACKENDS = ["reference", "torch", "triton"]
# The Triton loss in its default mode and in both cuBLAS modes (triton_ops.BACKWARD): with a
# group "in-forward" runs as "recompute", which this checks.
LOSS_VARIANTS = {
    "reference": None,
    "torch": None,
    "triton": None,
    "triton-recompute": "recompute",
    "triton-in-forward": "in-forward",
}
N, D, K = 60, 40, 4
REAL_VOCAB, PADDED_VOCAB = 507, 508  # padded to a multiple of TP=2 and TP=4
# Unweighted, and position weights that zero one position (as well as the ignored targets).
POSITION_WEIGHTS = {"uniform": None, "weighted": [3.0, 0.0, 1.0, 0.5]}


def _inputs(world_size):
    hidden, weight, targets = loss_inputs(N, PADDED_VOCAB, D, K, vocab_size=REAL_VOCAB, seed=11)
    shard = PADDED_VOCAB // world_size
    # Ids on both sides of every shard boundary, first and last real ids.
    edges = sorted(
        {0, REAL_VOCAB - 1} | {b + o for b in range(shard, REAL_VOCAB, shard) for o in (-1, 0)}
    )
    edges = torch.tensor(edges)
    targets[: len(edges), 0] = edges
    ids = targets.clamp(min=0)
    ids[-len(edges) :, -1] = edges
    ids[::5, 2] = ids[::5, 1]  # duplicates inside a patch
    grad_out = torch.randn(N, D, generator=torch.Generator().manual_seed(12))
    return hidden, weight, targets, ids, grad_out


def _tp_body(rank, world_size, vocab_sizes):
    import triton

    from megapatch.ops import triton_ops

    assert triton.knobs.runtime.interpret  # the harness sets TRITON_INTERPRET=1 first
    hidden, weight, targets, ids, grad_out = _inputs(world_size)
    shard = PADDED_VOCAB // world_size
    start = rank * shard
    results = {}
    for vocab_size in vocab_sizes:
        # Targets folded into the real vocabulary; ignored ones stay ignored.
        targets_v = torch.where(targets >= vocab_size, targets % vocab_size, targets)
        for variant, mode in LOSS_VARIANTS.items():
            saved, triton_ops.BACKWARD = triton_ops.BACKWARD, mode or triton_ops.BACKWARD
            for name, weights in POSITION_WEIGHTS.items():
                h = hidden.clone().requires_grad_()
                w = weight[start : start + shard].clone().requires_grad_()
                loss = vocab_parallel_patch_loss(
                    h,
                    w,
                    targets_v,
                    vocab_start=start,
                    vocab_size=vocab_size,
                    position_weights=None if weights is None else torch.tensor(weights),
                    backend=variant.split("-")[0],
                )
                loss.backward()
                results[vocab_size, variant, name] = {
                    "loss": loss.detach(),
                    "grad_hidden": h.grad,
                    "grad_weight": w.grad,
                }
            triton_ops.BACKWARD = saved
        for backend in BACKENDS:
            w_emb = weight[start : start + shard].clone().requires_grad_()
            out = vocab_parallel_patch_embedding(ids, w_emb, vocab_start=start, backend=backend)
            out.backward(grad_out)
            results[vocab_size, backend, "embedding"] = {
                "embedding": out.detach(),
                "embedding_grad": w_emb.grad,
            }
    return results


# One spawn per TP size: starting processes costs far more than these small ops.
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_equals_single_process(world_size):
    pytest.importorskip("triton")
    shard = PADDED_VOCAB // world_size
    vocab_sizes = [REAL_VOCAB]
    if world_size == 4:
        vocab_sizes.append(PADDED_VOCAB - shard - 10)  # the last shard holds padding only
    ranks = run_distributed(_tp_body, world_size, vocab_sizes, env={"TRITON_INTERPRET": "1"})
    hidden, weight, targets, ids, grad_out = _inputs(world_size)
    want_emb, want_emb_grad = embedding_truth(ids, weight, grad_out)
    for vocab_size in vocab_sizes:
        targets_v = torch.where(targets >= vocab_size, targets % vocab_size, targets)
        for name, weights in POSITION_WEIGHTS.items():
            want, want_h, want_w = loss_truth(
                hidden, weight, targets_v, vocab_size, position_weights=weights
            )
            for variant in LOSS_VARIANTS:
                case = (vocab_size, variant, name)
                per_rank = [r[case] for r in ranks]
                for got in per_rank:  # every rank holds the full loss and hidden gradient
                    assert abs(got["loss"].item() - want.item()) <= 1e-6 * want.item(), case
                    assert rel_err(got["grad_hidden"], want_h) <= 1e-5, case
                grad_w = torch.cat([got["grad_weight"] for got in per_rank])
                assert rel_err(grad_w, want_w) <= 1e-5, case
                assert torch.count_nonzero(grad_w[vocab_size:]) == 0, case  # padding: nothing
        for backend in BACKENDS:
            case = (vocab_size, backend, "embedding")
            per_rank = [r[case] for r in ranks]
            for got in per_rank:
                assert rel_err(got["embedding"], want_emb) <= 1e-6, case
            emb_grad = torch.cat([got["embedding_grad"] for got in per_rank])
            assert rel_err(emb_grad, want_emb_grad) <= 1e-5, case
