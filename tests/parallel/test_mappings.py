"""Forward and backward of the four TP mappings, against what each must compute."""

import pytest
import torch

from megapatch.parallel import (
    copy_to_tensor_model_parallel_region,
    destroy_model_parallel,
    gather_from_tensor_model_parallel_region,
    initialize_model_parallel,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from tests.distributed import run_distributed

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")

MAPPINGS = {
    "copy": copy_to_tensor_model_parallel_region,
    "reduce": reduce_from_tensor_model_parallel_region,
    "scatter": scatter_to_tensor_model_parallel_region,
    "gather": gather_from_tensor_model_parallel_region,
}


def _rank_tensor(seed: int, rank: int, shape) -> torch.Tensor:
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(1000 * seed + rank), dtype=torch.float64
    )


def _forward_backward(name, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = MAPPINGS[name](x)
    y.backward(grad_out)
    return y.detach().numpy(), x.grad.numpy()  # numpy: tensors cannot cross the result queue


def _all_mappings(rank, world_size):
    initialize_model_parallel(world_size)
    out = {}
    # copy / reduce: rank-dependent input and upstream gradient of the same shape.
    for name in ("copy", "reduce"):
        out[name] = _forward_backward(
            name, _rank_tensor(1, rank, (3, 4)), _rank_tensor(2, rank, (3, 4))
        )
    # scatter: a replicated full input; the upstream gradient is this rank's slice.
    out["scatter"] = _forward_backward(
        "scatter", _rank_tensor(3, 0, (3, 8)), _rank_tensor(4, rank, (3, 4))
    )
    # gather: this rank's slice as input; a replicated full upstream gradient.
    out["gather"] = _forward_backward(
        "gather", _rank_tensor(5, rank, (3, 4)), _rank_tensor(6, 0, (3, 8))
    )
    destroy_model_parallel()
    return out


@pytest.mark.distributed
def test_mappings_forward_and_backward_at_tp2():
    results = run_distributed(_all_mappings, 2, reuse_workers=True)
    ranks = range(2)
    for rank, r in enumerate(results):
        r = {name: tuple(torch.from_numpy(a) for a in pair) for name, pair in r.items()}
        y, gx = r["copy"]
        assert torch.equal(y, _rank_tensor(1, rank, (3, 4)))
        torch.testing.assert_close(gx, sum(_rank_tensor(2, q, (3, 4)) for q in ranks))

        y, gx = r["reduce"]
        torch.testing.assert_close(y, sum(_rank_tensor(1, q, (3, 4)) for q in ranks))
        assert torch.equal(gx, _rank_tensor(2, rank, (3, 4)))

        y, gx = r["scatter"]
        assert torch.equal(y, _rank_tensor(3, 0, (3, 8))[:, 4 * rank : 4 * rank + 4])
        assert torch.equal(gx, torch.cat([_rank_tensor(4, q, (3, 4)) for q in ranks], dim=-1))

        y, gx = r["gather"]
        assert torch.equal(y, torch.cat([_rank_tensor(5, q, (3, 4)) for q in ranks], dim=-1))
        assert torch.equal(gx, _rank_tensor(6, 0, (3, 8))[:, 4 * rank : 4 * rank + 4])


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_mappings_are_the_identity_at_tp1(name):
    x, g = _rank_tensor(7, 0, (2, 6)), _rank_tensor(8, 0, (2, 6))
    y, gx = (torch.from_numpy(a) for a in _forward_backward(name, x, g))
    assert torch.equal(y, x) and torch.equal(gx, g)
