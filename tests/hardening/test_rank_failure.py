"""A rank that stops responding: the others fail within the collective timeout with one
clear line, torchrun ends the job, and the last checkpoint stays loadable.
(A rank that dies outright is one of the strikes in test_kill_anywhere.)"""

from __future__ import annotations

import datetime

import pytest
import torch

from megapatch.checkpoint.full_weights import read_checkpoint
from tests.distributed import run_distributed
from tests.hardening.conftest import assert_no_megapatch_traceback, error_line, step_dir
from tests.training.conftest import run_train, train_records


def _silent_peer(rank, world_size):
    """Rank 1 stays alive but never joins the collective on a group made after the
    timeout was set; rank 0 must get a timeout, not wait for rank 1 to leave."""
    import torch.distributed as dist

    from megapatch.distributed import (
        RankFailureError,
        rank_failures_reported,
        set_collective_timeout,
    )

    set_collective_timeout(2.0, source="MEGAPATCH_COLLECTIVE_TIMEOUT_S")
    group = dist.new_group([0, 1])  # like the TP/DP groups: made after init
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        store.wait(["rank0-done"], datetime.timedelta(seconds=120))
        return None
    try:
        with rank_failures_reported(lambda: "in the test"):
            dist.all_reduce(torch.ones(1), group=group)
    except RankFailureError as exc:
        return str(exc)
    finally:
        store.set("rank0-done", "1")
    return None


@pytest.mark.distributed
def test_groups_made_after_init_inherit_the_collective_timeout():
    message, _ = run_distributed(_silent_peer, 2)
    assert message is not None, "the collective on the new group did not fail"
    assert message.startswith("rank 0 lost contact with the other ranks (Timed out"), message
    assert "collective timeout of 2 s (MEGAPATCH_COLLECTIVE_TIMEOUT_S)" in message
    assert message.endswith("stopped in the test")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_ends_the_job_within_the_timeout(tiny_corpus, reference_dp2, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        "MEGAPATCH_FAULT_HANG_AFTER_STEP": "4",
        "MEGAPATCH_FAULT_RANKS": "1",
        "MEGAPATCH_COLLECTIVE_TIMEOUT_S": "10",
    }
    # Without the bound this would wait for torch's 30-minute default; the limit here fails it.
    proc = run_train(tiny_corpus, run_dir, nproc=2, env=env, check=False, timeout=240)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "rank 0 lost contact with the other ranks (Timed out" in line, line
    assert "collective timeout of 10 s" in line and "stopped after step 4" in line
    assert f"{step_dir(run_dir, 3)}: restart the job with train.resume=auto" in line
    assert_no_megapatch_traceback(proc.stderr)
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4]

    # the last checkpoint is whole: it reads back as the uninterrupted run's step 3
    saved, expected = read_checkpoint(run_dir), read_checkpoint(step_dir(reference_dp2, 3))
    assert saved.step == 3
    for name, weight in expected.state_dict.items():
        torch.testing.assert_close(saved.state_dict[name], weight, rtol=0, atol=0, msg=name)
