"""Real gloo processes: every rank builds its own loader from its (TP, DP) coordinates."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megapatch.data import PrefetchLoader, WindowSampler, build_phase_streams, open_corpus
from tests.data.helpers import counting_prep
from tests.distributed import run_distributed

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")

K, L, G, STEPS = 4, 8, 8, 6


def _streams(path):
    corpus = open_corpus(path)
    return build_phase_streams(
        corpus, total_tokens=12000, patch_fraction=0.5, patch_size=K, seq_len=L, seed=11
    )


def _global_batches(rank, world_size, path, tp, state):
    """Run STEPS steps of the patch phase with TP=tp, DP=world/tp (TP ranks adjacent);
    return every rank's micro-batches gathered on all ranks, and the sampler state."""
    dp_size, dp_rank = world_size // tp, rank // tp
    sampler = WindowSampler(
        _streams(path)["patch"], global_batch=G, dp_rank=dp_rank, dp_size=dp_size
    )
    if state is not None:
        sampler.load_state_dict(state)
    loader = PrefetchLoader(sampler, micro_batch_size=1, num_workers=2)
    mine = torch.stack([next(loader) for _ in range(STEPS * G // dp_size)])  # [steps·G/dp, 1, W]
    loader.close()
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return [g.numpy() for g in gathered], sampler.state_dict()


def _body(rank, world_size, path):
    tp2 = _global_batches(rank, world_size, path, tp=2, state=None)
    dp4 = _global_batches(rank, world_size, path, tp=1, state=None)
    resumed = _global_batches(rank, world_size, path, tp=2, state=dp4[1])  # DP 4 → DP 2
    return tp2, dp4, resumed


def _steps(per_rank, dp_size, tp):
    """Global batches [STEPS, G, W] from the micro-batches of DP ranks 0..dp-1."""
    local = G // dp_size
    by_dp = [per_rank[d * tp].reshape(STEPS, local, -1) for d in range(dp_size)]
    return np.concatenate(by_dp, axis=1)


@pytest.mark.distributed
@pytest.mark.slow
def test_dp_size_independence_and_tp_peers(tmp_path):
    path = counting_prep(tmp_path / "p", 20000)
    results = run_distributed(_body, 4, str(path), timeout=240, reuse_workers=True)
    stream = _streams(path)["patch"]
    expected = stream.get_many(np.arange(2 * STEPS * G)).reshape(2 * STEPS, G, -1)

    (tp2, tp2_state), (dp4, dp4_state), (resumed, _) = results[0]
    assert all(r[1] == tp2_state for r in (res[0] for res in results))
    assert tp2_state == dp4_state == {"consumed_windows": STEPS * G}
    for a, b in [(0, 1), (2, 3)]:  # tensor-parallel peers read identical batches
        assert (tp2[a] == tp2[b]).all() and (resumed[a] == resumed[b]).all()
    assert (_steps(tp2, 2, 2) == expected[:STEPS]).all()  # DP=2
    assert (_steps(dp4, 4, 1) == expected[:STEPS]).all()  # DP=4
    assert (_steps(resumed, 2, 2) == expected[STEPS:]).all()  # resumed at DP=2 from DP=4
