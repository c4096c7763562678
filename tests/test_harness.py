import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


@pytest.mark.distributed
def test_run_distributed_returns_results_by_rank():
    assert run_distributed(_all_reduce_rank, 2) == [3.0, 3.0]


@pytest.mark.distributed
def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def _return_tensor(rank, world_size):
    return {"t": torch.full((3,), float(rank))}


@pytest.mark.distributed
def test_run_distributed_returns_tensors():
    out = run_distributed(_return_tensor, 2, reuse_workers=True)
    assert torch.equal(out[1]["t"], torch.ones(3))


def _pid_after_all_reduce(rank, world_size):
    _all_reduce_rank(rank, world_size)  # the group still works
    return os.getpid()


@pytest.mark.distributed
def test_reused_workers_run_later_calls_and_a_failure_discards_them():
    first = run_distributed(_pid_after_all_reduce, 2, reuse_workers=True)
    assert run_distributed(_pid_after_all_reduce, 2, reuse_workers=True) == first
    assert len(set(first)) == 2 and os.getpid() not in first
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60, reuse_workers=True)
    after = run_distributed(_pid_after_all_reduce, 2, reuse_workers=True)
    assert not set(after) & set(first), "a failed call's processes were used again"
