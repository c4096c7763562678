"""The rules behind the hardening, in-process: which checkpoints a run may resume, which
errors count as a lost peer, how the fault and timeout variables are read."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from megapatch import faults
from megapatch.checkpoint.resume import check_resumable
from megapatch.distributed import collective_timeout_s, is_collective_failure
from megapatch.errors import CheckpointError, ConfigError, DataError

PATH = Path("/runs/a/checkpoints/step_00000100")
MODEL = {
    "vocab_size": 400,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "ffn_hidden": 64,
    "ops_backend": "auto",
}
RUN = {
    "model_config": MODEL,
    "tokenizer_sha256": "ab" * 32,
    "config_hash": "0123456789abcdef",
    "tensor_model_parallel_size": 1,
    "zero_stage": 1,
    "data_parallel_size": 2,
}


def _saved(**changes):
    return {**RUN, **changes}


@pytest.mark.parametrize(
    "saved, current",
    [
        (_saved(), {}),
        (_saved(zero_stage=2), {}),  # ZeRO-1 and ZeRO-2 share a format
        (_saved(data_parallel_size=4, zero_stage=0), {"zero_stage": 0, "data_parallel_size": 2}),
        (_saved(model_config={**MODEL, "ops_backend": "triton"}), {}),  # runtime only
        ({k: v for k, v in RUN.items() if k != "tokenizer_sha256"}, {}),  # older checkpoints
    ],
    ids=["same", "zero1-to-2", "zero0-any-dp", "other-ops-backend", "no-tokenizer-recorded"],
)
def test_resumable(saved, current):
    assert check_resumable(PATH, saved, {**RUN, **current}) is False


@pytest.mark.parametrize(
    "saved, current",
    [
        (_saved(tensor_model_parallel_size=2), {}),
        (_saved(zero_stage=2), {"zero_stage": 3}),
        (_saved(data_parallel_size=4), {}),
        (_saved(data_parallel_size=4, zero_stage=2, tensor_model_parallel_size=2), {}),
        (_saved(zero_stage=3), {}),
        (_saved(zero_stage=0), {}),
        (_saved(pipeline_model_parallel_size=2), {}),
    ],
    ids=["tp", "zero2-to-3", "dp", "all", "zero3-to-1", "zero0-to-1", "pp"],
)
def test_resumable_once_resharded(saved, current):
    assert check_resumable(PATH, saved, {**RUN, **current}) is True


@pytest.mark.parametrize(
    "saved, error, expected",
    [
        (_saved(model_config={**MODEL, "d_model": 64}), CheckpointError, "model.d_model=64 there, 32 here"),
        (_saved(model_config={**MODEL, "vocab_size": 512}), CheckpointError, "the vocabulary differs"),
        (_saved(tokenizer_sha256="cd" * 32), DataError, "re-prepped with another tokenizer"),
        (_saved(config_hash="fedcba9876543210"), CheckpointError, "belongs to a run with config hash"),
        (_saved(tensor_model_parallel_size=2), CheckpointError,
         "cannot be resharded to TP=4 x DP=2, ZeRO-1: parallel.tensor_model_parallel_size=4, expected a divisor of model.n_heads=2"),
    ],
    ids=["shape", "vocabulary", "tokenizer", "config", "tp-not-dividing-heads"],
)  # fmt: skip
def test_not_resumable(saved, error, expected):
    # TP=4 does not divide the 2 heads (a run config would refuse it; a checkpoint's is checked too)
    current = (
        RUN
        if saved["tensor_model_parallel_size"] == 1
        else {**RUN, "tensor_model_parallel_size": 4}
    )
    with pytest.raises(error) as info:
        check_resumable(PATH, saved, current)
    assert expected in str(info.value) and str(PATH) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "exc, lost",
    [
        (RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4242"), True),
        (RuntimeError("[unbound_buffer.cc:78] Timed out waiting 10000ms for recv"), True),
        (RuntimeError("Read error [127.0.0.1]:5: Connection reset by peer"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("Connection closed"), False),
    ],
)
def test_what_counts_as_a_lost_peer(exc, lost):
    assert is_collective_failure(exc) is lost


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("MEGAPATCH_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout_s() == 600
    monkeypatch.setenv("MEGAPATCH_COLLECTIVE_TIMEOUT_S", "12.5")
    assert collective_timeout_s() == 12.5
    for bad in ("0", "-3", "ten", "inf", "nan"):
        monkeypatch.setenv("MEGAPATCH_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="expected a positive number of seconds"):
            collective_timeout_s()


def test_injected_write_errors(monkeypatch):
    monkeypatch.setenv("MEGAPATCH_FAULT_SAVE_ERROR", "ENOSPC@6,9")
    faults.check_write("x", 5)
    faults.check_write("x", None)  # a write of no step fails only when every write does
    with pytest.raises(OSError) as info:
        faults.check_write("/ckpt/x.pt", 9)
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/ckpt/x.pt"
    monkeypatch.setenv("MEGAPATCH_FAULT_SAVE_ERROR", "EROFS")
    with pytest.raises(OSError, match="Read-only file system"):
        faults.check_write("x", None)
    monkeypatch.setenv("MEGAPATCH_FAULT_RANKS", "1")
    monkeypatch.setenv("RANK", "0")
    faults.check_write("x", None)  # another rank's fault
