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
