import gc

import numpy as np
import pytest
import torch

from megapatch.data import (
    PrefetchLoader,
    WindowSampler,
    build_phase_streams,
    eval_windows,
    open_corpus,
)
from megapatch.errors import ConfigError, DataError
from tests.data.helpers import counting_prep, write_prep

K, L = 4, 8


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    corpus = open_corpus(counting_prep(tmp_path_factory.mktemp("c") / "p", 20000))
    streams = build_phase_streams(
        corpus, total_tokens=12000, patch_fraction=0.5, patch_size=K, seq_len=L, seed=3
    )
    return streams["patch"]


@pytest.mark.parametrize("num_workers", [1, 3])
def test_micro_batches_follow_the_sampler(stream, num_workers):
    sampler = WindowSampler(stream, global_batch=12, dp_rank=1, dp_size=2)  # 6 per rank
    loader = PrefetchLoader(sampler, 2, num_workers=num_workers, prefetch=2)
    expected = [sampler.fetch(b * 12) for b in range(10)]
    for b in range(10):
        for m in range(3):
            micro = next(loader)
            assert micro.dtype == torch.int64 and micro.shape == (2, K * L + K)
            assert micro.numpy().tolist() == expected[b][2 * m : 2 * m + 2].tolist()
            # A batch counts as consumed once its last micro-batch is handed out.
            assert sampler.state_dict() == {"consumed_windows": 12 * (b + (m == 2))}
    loader.close()


def test_resume_through_the_loader_with_another_dp_size(stream):
    whole = WindowSampler(stream, global_batch=8)
    reference = [whole.fetch(8 * b) for b in range(12)]
    first = WindowSampler(stream, global_batch=8, dp_rank=0, dp_size=2)
    loader = PrefetchLoader(first, 2)
    for _ in range(5 * 2):  # 5 global batches, 2 micro-batches each on this rank
        next(loader)
    state = loader.state_dict()
    loader.close()
    assert state == {"consumed_windows": 40}
    resumed = WindowSampler(stream, global_batch=8, dp_rank=3, dp_size=4)
    resumed.load_state_dict(state)
    loader = PrefetchLoader(resumed, 1)
    for b in range(5, 12):
        assert next(loader).numpy().tolist() == reference[b][6:7].tolist()
        assert next(loader).numpy().tolist() == reference[b][7:8].tolist()
    loader.close()


def test_loading_a_state_restarts_the_prefetch(stream):
    sampler = WindowSampler(stream, global_batch=4)
    loader = PrefetchLoader(sampler, 4, prefetch=3)
    for _ in range(3):
        next(loader)
    loader.load_state_dict({"consumed_windows": 100})
    assert next(loader).numpy().tolist() == stream.get_many(np.arange(100, 104)).tolist()
    assert sampler.state_dict() == {"consumed_windows": 104}
    loader.close()


def test_errors_in_the_background_reach_the_consumer(stream, monkeypatch):
    sampler = WindowSampler(stream, global_batch=4)
    loader = PrefetchLoader(sampler, 4)

    def broken(indices, out=None):
        raise DataError("disk went away")

    monkeypatch.setattr(stream, "get_many", broken)
    with pytest.raises(DataError, match="disk went away"):
        next(loader)
    loader.close()


def test_micro_batch_must_divide_the_local_batch(stream):
    with pytest.raises(ConfigError, match="micro batch of 4 does not divide this rank's 6"):
        PrefetchLoader(WindowSampler(stream, global_batch=12, dp_size=2), 4)


def test_eval_windows_score_every_token_once(tmp_path):
    valid = [np.arange(100 * d + 4, 100 * d + 90) for d in range(5)]  # 87 tokens with EOS
    corpus = open_corpus(write_prep(tmp_path / "p", {"valid": valid}, vocab_size=1000), "valid")
    tokens = corpus.read(0, corpus.num_tokens)
    w = eval_windows(corpus, seq_len=L)
    assert w.dtype == np.int64 and w.shape == ((corpus.num_tokens - 1) // L, L + 1)
    targets = np.concatenate([row[1:] for row in w])
    assert targets.tolist() == tokens[1 : 1 + len(targets)].tolist()
    patch = eval_windows(corpus, seq_len=L, patch_size=K)
    assert patch.shape == ((corpus.num_tokens - K) // (K * L), K * L + K)
    assert (
        np.concatenate([row[K:] for row in patch]).tolist()
        == tokens[K : K + K * L * len(patch)].tolist()
    )
    few = eval_windows(corpus, seq_len=L, max_windows=5)
    n = len(w)
    assert few.tolist() == w[(np.arange(5) * n) // 5].tolist()
    with pytest.raises(DataError, match="fewer than one window of 1025"):
        eval_windows(corpus, seq_len=1024)


def test_a_dropped_loader_stops_its_threads(stream):
    loader = PrefetchLoader(WindowSampler(stream, global_batch=4), 2, num_workers=2)
    next(loader)
    threads = list(loader._threads)
    assert all(t.is_alive() for t in threads)
    del loader
    gc.collect()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
