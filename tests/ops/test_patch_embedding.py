"""patch_embedding, every backend, against a float64 ground truth."""

import pytest
import torch
import torch.nn.functional as F

from megapatch.ops import patch_embedding
from tests.ops import cases
from tests.ops.truth import embedding_truth, rel_err


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_matches_float64_mean(run, k):
    errors = run(cases.embedding_errors, k, k)
    assert errors["out"] <= 1e-6 and errors["grad_weight"] <= 1e-5, errors


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bf16_accumulates_in_fp32(backend):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=g).bfloat16()
    ids = torch.zeros(400, 4, dtype=torch.long)  # every patch hits row 0: 400 additions
    ids[:, 1:] = torch.randint(0, 64, (400, 3), generator=g)
    grad_out = torch.randn(400, 32, generator=g).bfloat16()
    want, want_grad = embedding_truth(ids, weight, grad_out)
    w = weight.clone().requires_grad_()
    out = patch_embedding(ids, w, backend=backend)
    out.backward(grad_out)
    assert out.dtype == w.grad.dtype == torch.bfloat16
    assert rel_err(out, want) <= 4e-3  # one bf16 rounding of the output
    assert rel_err(w.grad, want_grad) <= 4e-3  # not hundreds of bf16 roundings


def test_k1_is_an_embedding_lookup():
    weight = torch.randn(50, 8)
    ids = torch.randint(0, 50, (2, 7, 1))
    out = patch_embedding(ids, weight, backend="torch")
    assert torch.equal(out, F.embedding(ids[..., 0], weight))
