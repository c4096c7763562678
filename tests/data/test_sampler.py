import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megapatch.data import WindowSampler, build_phase_streams, open_corpus
from megapatch.errors import CheckpointError, ConfigError, DataError
from tests.data.helpers import counting_prep, write_prep

K, L = 4, 8  # patch window 36 tokens at stride 32; token window 9 at stride 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return open_corpus(counting_prep(tmp_path_factory.mktemp("c") / "p", 20000))


def _streams(corpus, total, fraction=0.5, k=K, seed=7):
    return build_phase_streams(
        corpus, total_tokens=total, patch_fraction=fraction, patch_size=k, seq_len=L, seed=seed
    )


def _epoch_starts(stream, epoch):
    n = stream.windows_per_epoch
    return stream.locate(np.arange(epoch * n, (epoch + 1) * n))[1]


def test_budget_that_fits_splits_the_tokens_between_phases(corpus):
    streams = _streams(corpus, total=12000, fraction=0.5)
    patch, token = streams["patch"], streams["token"]
    assert (patch.window, patch.stride, token.window, token.stride) == (36, 32, 9, 8)
    assert patch.windows_per_epoch == (6000 - K) // 32
    assert token.windows_per_epoch == (6000 - 1) // 8
    assert not patch.multi_epoch and not token.multi_epoch
    p, t = _epoch_starts(patch, 0), _epoch_starts(token, 0)
    # Each window once per epoch, and no token in both phases (targets included).
    assert sorted(p.tolist()) == list(range(0, 32 * patch.windows_per_epoch, 32))
    assert sorted(t.tolist()) == list(range(6000, 6000 + 8 * token.windows_per_epoch, 8))
    assert p.max() + patch.window <= 6000 <= t.min() and t.max() + token.window <= 12000


def test_windows_hold_the_corpus_tokens_they_name(corpus):
    for stream in _streams(corpus, total=12000).values():
        idx = np.array([0, 5, 17, stream.windows_per_epoch + 3])
        windows = stream.get_many(idx)
        assert windows.dtype == np.int64 and windows.shape == (4, stream.window)
        for w, start in zip(windows, stream.locate(idx)[1]):
            assert w.tolist() == corpus.read(int(start), stream.window).tolist()
        assert stream.get(5).tolist() == windows[1].tolist()


def test_each_epoch_is_a_fresh_permutation(corpus):
    patch = _streams(corpus, total=12000)["patch"]
    e0, e1, e2 = (_epoch_starts(patch, e) for e in range(3))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == sorted(e2.tolist())
    assert e0.tolist() != e1.tolist() != e2.tolist()
    assert e0.tolist() != sorted(e0.tolist())  # shuffled, not in corpus order
    again = _streams(corpus, total=12000)["patch"]
    assert _epoch_starts(again, 1).tolist() == e1.tolist()  # seeded
    other = _streams(corpus, total=12000, seed=8)["patch"]
    assert _epoch_starts(other, 0).tolist() != e0.tolist()


def test_multi_epoch_budget_cycles_each_phase_over_the_whole_corpus(corpus):
    streams = _streams(corpus, total=3 * corpus.num_tokens, fraction=2 / 3)
    for stream in streams.values():
        assert stream.multi_epoch
        starts = _epoch_starts(stream, 0)
        assert sorted(starts.tolist()) == list(
            range(0, stream.stride * stream.windows_per_epoch, stream.stride)
        )
        assert starts.max() + stream.window <= corpus.num_tokens
    patch, token = streams["patch"], streams["token"]
    # The patch phase's share is 2 of the 3 epochs, the token phase's the third.
    assert patch.budget_tokens / (patch.windows_per_epoch * patch.stride) == pytest.approx(
        2, rel=0.01
    )
    assert token.budget_tokens / (token.windows_per_epoch * token.stride) == pytest.approx(
        1, rel=0.01
    )


def test_patch_size_one_and_phase_without_budget(corpus):
    streams = _streams(corpus, total=8000, fraction=0.5, k=1)
    assert streams["patch"].window == streams["token"].window == L + 1
    streams = _streams(corpus, total=8000, fraction=0.0)
    assert streams["patch"].windows_per_epoch == 0
    with pytest.raises(IndexError, match="patch phase has no windows"):
        streams["patch"].get(0)
    assert sorted(_epoch_starts(streams["token"], 0).tolist())[0] == 0


def test_bad_budgets(corpus):
    with pytest.raises(
        DataError, match="the patch phase's tokens \\[0, 20\\) hold no window of 36"
    ):
        _streams(corpus, total=40, fraction=0.5)
    with pytest.raises(ConfigError, match="patch fraction"):
        _streams(corpus, total=4000, fraction=1.5)
    with pytest.raises(ConfigError, match="total_tokens"):
        _streams(corpus, total=0)


def _global_batches(stream, global_batch, dp_size, n_batches, state=None):
    """Global batches as seen by all dp ranks together (each from its own sampler)."""
    samplers = []
    for r in range(dp_size):
        s = WindowSampler(stream, global_batch=global_batch, dp_rank=r, dp_size=dp_size)
        if state is not None:
            s.load_state_dict(state)
        samplers.append(s)
    iters = [iter(s) for s in samplers]
    batches = [np.concatenate([next(it) for it in iters]) for _ in range(n_batches)]
    states = {str(s.state_dict()) for s in samplers}
    assert len(states) == 1  # every rank holds the same state
    return batches, samplers[0].state_dict()


def test_global_batches_do_not_depend_on_the_dp_size(corpus):
    stream = _streams(corpus, total=12000)["patch"]
    ref, _ = _global_batches(stream, 8, 1, 30)  # 30 × 8 > one epoch of 187 windows
    for dp in (2, 4, 8):
        got, _ = _global_batches(stream, 8, dp, 30)
        assert all((a == b).all() for a, b in zip(ref, got))
    expected = stream.get_many(np.arange(8 * 30)).reshape(30, 8, -1)
    assert all((a == b).all() for a, b in zip(ref, expected))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stop=st.integers(0, 40),
    dp_before=st.sampled_from([1, 2, 4]),
    dp_after=st.sampled_from([1, 2, 4]),
    phase=st.sampled_from(["patch", "token"]),
)
def test_resume_continues_with_the_next_window(corpus, stop, dp_before, dp_after, phase):
    stream = _streams(corpus, total=12000)[phase]
    whole, _ = _global_batches(stream, 4, 1, 50)
    _, state = _global_batches(stream, 4, dp_before, stop)
    assert state == {"consumed_windows": 4 * stop}
    rest, _ = _global_batches(stream, 4, dp_after, 50 - stop, state=state)
    assert all((a == b).all() for a, b in zip(whole[stop:], rest))


def test_resume_with_another_global_batch_continues_at_the_window(corpus):
    stream = _streams(corpus, total=12000)["token"]
    sampler = WindowSampler(stream, global_batch=6)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    resumed = WindowSampler(stream, global_batch=4, dp_rank=1, dp_size=2)
    resumed.load_state_dict(sampler.state_dict())
    assert next(iter(resumed)).tolist() == stream.get_many([20, 21]).tolist()
    assert np.concatenate(first).tolist() == stream.get_many(np.arange(18)).tolist()


def test_sampler_argument_and_state_errors(corpus):
    stream = _streams(corpus, total=12000)["patch"]
    with pytest.raises(ConfigError, match="does not split over 3"):
        WindowSampler(stream, global_batch=8, dp_size=3)
    with pytest.raises(ConfigError, match="rank 2 outside a group of 2"):
        WindowSampler(stream, global_batch=8, dp_rank=2, dp_size=2)
    sampler = WindowSampler(stream, global_batch=8)
    for bad in ({}, {"consumed_windows": -1}, {"consumed_windows": "3"}, None):
        with pytest.raises(CheckpointError, match="consumed_windows"):
            sampler.load_state_dict(bad)


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    a = counting_prep(root / "a", 8000, offset=0)
    b = counting_prep(root / "b", 30000, offset=30000)
    return open_corpus([{"path": str(a), "weight": 0.3}, {"path": str(b), "weight": 0.7}])


def test_blend_follows_the_weights(blend):
    assert [round(w, 6) for w in blend.weights] == [0.3, 0.7]
    token = _streams(blend, total=20000)["token"]
    n = 20000
    sources, starts = token.locate(np.arange(n))
    share = np.bincount(sources, minlength=2) / n
    assert share == pytest.approx([0.3, 0.7], abs=2e-3)
    for window in (slice(0, 100), slice(5000, 5200), slice(19000, 20000)):  # also locally
        assert np.mean(sources[window] == 0) == pytest.approx(0.3, abs=0.03)
    # Each source's windows come from its own tokens, its share of the budget split by phase.
    windows = token.get_many(np.arange(200))  # b's tokens are ≥ 30004, a's below
    from_b = (windows >= 30004)[windows != 2]
    assert (from_b == np.repeat(sources[:200] == 1, token.window)[windows.ravel() != 2]).all()
    a_src, b_src = token.sources
    assert (a_src.start, b_src.start) == (3000, 7000)  # λ of 0.3·20000 and of 0.7·20000
    assert not a_src.multi_epoch and not b_src.multi_epoch


def test_blend_source_needing_epochs_repeats_alone(blend):
    streams = _streams(blend, total=40000)  # a's share (12000) exceeds its 8000 tokens
    a_src, b_src = streams["patch"].sources
    assert a_src.multi_epoch and a_src.start == 0 and not b_src.multi_epoch


def test_blend_errors(tmp_path, blend):
    a = blend.sources[0].directory
    with pytest.raises(ConfigError, match="weight must be a positive number, got -1"):
        open_corpus([{"path": str(a), "weight": -1}, {"path": str(a), "weight": 1}])
    with pytest.raises(ConfigError, match="expected \\{path, weight\\}"):
        open_corpus([{"weight": 1}])
    other = write_prep(tmp_path / "other", {"train": [np.arange(4, 400)]}, vocab_size=1000)
    (other / "tokenizer.model").write_bytes(b"another tokenizer")
    manifest = (other / "manifest.json").read_text()
    sha = hashlib.sha256(b"another tokenizer").hexdigest()
    (other / "manifest.json").write_text(
        manifest.replace(manifest.split('"sha256": "')[1].split('"')[0], sha)
    )
    with pytest.raises(DataError, match="different tokenizers"):
        open_corpus([{"path": str(a), "weight": 1}, {"path": str(other), "weight": 1}])
