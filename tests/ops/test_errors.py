"""Bad input: one clear ConfigError line naming the values, before any work."""

import re

import pytest
import torch

from megapatch.errors import ConfigError
from megapatch.ops import (
    patch_embedding,
    patch_loss,
    vocab_parallel_patch_embedding,
    vocab_parallel_patch_loss,
)

V, D = 50, 8


@pytest.fixture
def weight():
    return torch.randn(V, D)


def _raises(match):
    return pytest.raises(ConfigError, match=match)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("bad", [V, -1, 10_000])
def test_embedding_id_outside_vocabulary(weight, bad):
    ids = torch.zeros(3, 4, dtype=torch.long)
    ids[1, 2] = bad
    with _raises(rf"patch_embedding: token id {bad} is outside the vocabulary \[0, {V}\)"):
        patch_embedding(ids, weight, backend="torch")


def test_embedding_float_ids(weight):
    with _raises("ids must be an integer tensor, got dtype torch.float32"):
        patch_embedding(torch.zeros(3, 4), weight)


def test_embedding_weight_not_a_matrix():
    with _raises(r"weight must be a floating \[V, D\] matrix, got \(50,\)"):
        patch_embedding(torch.zeros(3, 4, dtype=torch.long), torch.randn(V))


@pytest.mark.parametrize("shape", [(9, 4), (10,), (10, 4, 1), (10, 0)])
def test_loss_targets_of_the_wrong_shape(weight, shape):
    hidden = torch.randn(10, D)
    targets = torch.zeros(shape, dtype=torch.long)
    with _raises(r"targets must have shape \[N, K\] = \[10, K>=1\].*got " + re.escape(str(shape))):
        patch_loss(hidden, weight, targets)


def test_loss_width_mismatch(weight):
    with _raises("hidden width D=9 does not match weight width D=8"):
        patch_loss(torch.randn(10, 9), weight, torch.zeros(10, 2, dtype=torch.long))


def test_loss_target_in_padding(weight):
    targets = torch.zeros(10, 2, dtype=torch.long)
    targets[4, 1] = 45
    with _raises(r"target id 45 is outside the vocabulary \[0, 40\)"):
        patch_loss(torch.randn(10, D), weight, targets, vocab_size=40)


def test_loss_vocab_size_beyond_weight(weight):
    with _raises(r"vocab_size=51 must be in \[1, 50\]"):
        patch_loss(torch.randn(10, D), weight, torch.zeros(10, 2, dtype=torch.long), vocab_size=51)


def test_loss_ignore_index_is_a_real_token(weight):
    with _raises("ignore_index=3 is a real token id"):
        patch_loss(torch.randn(10, D), weight, torch.zeros(10, 2, dtype=torch.long), ignore_index=3)


def test_unknown_backend(weight):
    with _raises("ops backend 'cuda' is unknown; expected one of auto, reference, torch, triton"):
        patch_embedding(torch.zeros(2, 2, dtype=torch.long), weight, backend="cuda")


def test_triton_on_cpu_without_interpreter(weight, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with _raises("ops backend 'triton' needs CUDA tensors"):
        patch_embedding(torch.zeros(2, 2, dtype=torch.long), weight, backend="triton")


def test_auto_is_torch_on_cpu(weight, monkeypatch):
    from megapatch.ops import api

    seen = []
    monkeypatch.setattr(api, "_backend_module", lambda name: seen.append(name) or api.reference)
    patch_embedding(torch.zeros(2, 2, dtype=torch.long), weight)
    assert seen == ["torch"]


def test_vocab_parallel_bad_vocab_start(weight):
    # Outside a process group there is one shard, which starts at 0.
    with _raises("vocab_start=50 is not a shard boundary of 1 shards of 50 rows"):
        vocab_parallel_patch_embedding(torch.zeros(2, 2, dtype=torch.long), weight, vocab_start=50)
    with _raises("vocab_start=7 is not a shard boundary"):
        vocab_parallel_patch_loss(
            torch.randn(2, D),
            weight,
            torch.zeros(2, 2, dtype=torch.long),
            vocab_start=7,
            vocab_size=V,
        )


def test_single_rank_vocab_parallel_is_the_plain_op(weight):
    ids = torch.randint(0, V, (6, 4))
    hidden, targets = torch.randn(6, D), torch.randint(0, V, (6, 4))
    plain = patch_loss(hidden, weight, targets)
    sharded = vocab_parallel_patch_loss(hidden, weight, targets, vocab_start=0, vocab_size=V)
    assert torch.equal(plain, sharded)
    assert torch.equal(
        patch_embedding(ids, weight), vocab_parallel_patch_embedding(ids, weight, vocab_start=0)
    )


def test_int32_ids_and_targets_work(weight):
    ids = torch.randint(0, V, (6, 4))
    hidden, targets = torch.randn(6, D), torch.randint(0, V, (6, 4))
    for backend in ("reference", "torch"):
        assert torch.equal(
            patch_embedding(ids.int(), weight, backend=backend),
            patch_embedding(ids, weight, backend=backend),
        )
        assert torch.equal(
            patch_loss(hidden, weight, targets.int(), backend=backend),
            patch_loss(hidden, weight, targets, backend=backend),
        )


def _weighted_loss(weight, position_weights, *, parallel=False, targets=None):
    hidden = torch.randn(10, D)
    targets = torch.zeros(10, 4, dtype=torch.long) if targets is None else targets
    if parallel:
        return vocab_parallel_patch_loss(
            hidden, weight, targets, vocab_start=0, vocab_size=V, position_weights=position_weights
        )
    return patch_loss(hidden, weight, targets, position_weights=position_weights, backend="torch")


NAN, INF = float("nan"), float("inf")
# id: (position_weights for K=4 targets, the message after "<op>: position_weights ")
BAD_WEIGHTS = {
    "short": (
        torch.ones(3),
        r"must have shape \[K\] = \[4\] to match targets \[N, K\], got \(3,\)",
    ),
    "2-d": (torch.ones(1, 4), r"must have shape \[K\] = \[4\] .*got \(1, 4\)"),
    "negative": (torch.tensor([1, -0.5, 1, 1]), r"must be non-negative, got \[1, -0.5, 1, 1\]"),
    "all-zero": (torch.zeros(4), "are all zero; give at least one position a positive weight"),
    "nan": (torch.tensor([1, NAN, 1, 1]), r"must be finite, got \[1, nan, 1, 1\]"),
    "inf": (torch.tensor([1, INF, 1, 1]), r"must be finite, got \[1, inf, 1, 1\]"),
    "nan-and-negative": (torch.tensor([-1, NAN, 0, 0]), r"must be finite, got \[-1, nan, 0, 0\]"),
    "int": (torch.ones(4, dtype=torch.long), "must be a floating tensor, got dtype torch.int64"),
    "list": ([1.0, 1.0, 1.0, 1.0], "must be None or a tensor of K=4 weights, got list"),
    "device": (torch.ones(4, device="meta"), "on meta but hidden on cpu"),
}


@pytest.mark.parametrize("parallel", [False, True], ids=["plain", "vocab-parallel"])
@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_position_weights(weight, case, parallel):
    weights, match = BAD_WEIGHTS[case]
    op = "vocab_parallel_patch_loss" if parallel else "patch_loss"
    with _raises(f"^{op}: position_weights {match}$"):
        _weighted_loss(weight, weights, parallel=parallel)


def test_position_weights_keep_the_target_range_check(weight):
    targets = torch.zeros(10, 4, dtype=torch.long)
    targets[2, 3] = V + 4
    with _raises(rf"patch_loss: target id {V + 4} is outside the vocabulary \[0, {V}\)"):
        _weighted_loss(weight, torch.ones(4), targets=targets)


def test_position_weights_are_normalised_and_get_no_gradient(weight):
    hidden, targets = torch.randn(6, D), torch.randint(0, V, (6, 4))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    for backend in ("reference", "torch"):
        a = patch_loss(hidden, weight, targets, position_weights=weights, backend=backend)
        b = patch_loss(hidden, weight, targets, position_weights=weights * 8, backend=backend)
        assert torch.equal(a, b)  # ×8 is exact in fp32: the normalised weights are equal
        assert not a.requires_grad


# ----------------------------------------------------------------------------- value checks


def test_cpu_value_checks_run_on_every_call(weight):
    # The same shapes passed once; a later bad call is still refused: on the CPU nothing is
    # skipped, since the checks cost no host sync there.
    hidden, good = torch.randn(10, D), torch.zeros(10, 4, dtype=torch.long)
    bad = good.clone()
    bad[3, 1] = V
    patch_loss(hidden, weight, good, backend="torch")
    with _raises(rf"target id {V} is outside the vocabulary"):
        patch_loss(hidden, weight, bad, backend="torch")
    ids = torch.zeros(3, 4, dtype=torch.long)
    patch_embedding(ids, weight, backend="torch")
    with _raises("token id -1 is outside the vocabulary"):
        patch_embedding(ids - 1, weight, backend="torch")


class _Check:
    def __init__(self, fails=False):
        self.calls, self.fails = 0, fails

    def __call__(self):
        self.calls += 1
        if self.fails:
            raise ConfigError("bad values")


@pytest.fixture
def fresh_checks(monkeypatch):
    from megapatch.ops import _checks

    monkeypatch.setattr(_checks, "_PASSED", set())
    monkeypatch.delenv(_checks.DEBUG_CHECKS_ENV, raising=False)
    return _checks


def test_device_value_checks_run_once_per_signature(fresh_checks):
    cuda = torch.device("cuda", 0)  # only a name: nothing here touches a GPU
    check = _Check()
    for _ in range(3):
        fresh_checks.run_value_checks(("patch_loss", (8, 4)), cuda, check)
    assert check.calls == 1  # one host sync for the phase's shape, not one per step
    fresh_checks.run_value_checks(("patch_loss", (8, 1)), cuda, check)
    assert check.calls == 2  # another phase (K) is another signature


def test_device_value_check_that_failed_runs_again(fresh_checks):
    cuda = torch.device("cuda", 0)
    for _ in range(2):
        with _raises("bad values"):
            fresh_checks.run_value_checks(("patch_loss", (8, 4)), cuda, _Check(fails=True))


@pytest.mark.parametrize("value", ["1", "true"])
def test_debug_flag_checks_every_call_on_a_device(fresh_checks, monkeypatch, value):
    monkeypatch.setenv(fresh_checks.DEBUG_CHECKS_ENV, value)
    check = _Check()
    for _ in range(3):
        fresh_checks.run_value_checks(("patch_loss", (8, 4)), torch.device("cuda", 0), check)
    assert check.calls == 3


def test_cpu_checks_ignore_the_cache(fresh_checks):
    check = _Check()
    for _ in range(3):
        fresh_checks.run_value_checks(("patch_loss", (8, 4)), torch.device("cpu"), check)
    assert check.calls == 3 and not fresh_checks._PASSED
