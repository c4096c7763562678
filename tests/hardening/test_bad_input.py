"""Bad input through `megapatch train`, one test per row: one clear line naming what is
wrong, exit code 2, no traceback, nothing overwritten. The config rows and the data-reader
unit rows live in tests/training and tests/data (docs/reliability.md lists them all)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megapatch.data import IndexedDataset, IndexedDatasetWriter
from tests.hardening.conftest import (
    assert_no_megapatch_traceback,
    checkpoint_dirs,
    error_line,
    step_dir,
    tree_digest,
)
from tests.training.conftest import run_train

pytestmark = pytest.mark.slow


def _train_shard(prep: Path) -> Path:
    shards = json.loads((prep / "manifest.json").read_text())["splits"]["train"]["shards"]
    return prep / shards[0]["name"]


def _edit_manifest(prep: Path, edit) -> None:
    manifest = json.loads((prep / "manifest.json").read_text())
    edit(manifest)
    (prep / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _missing_shard(prep: Path) -> None:
    shard = _train_shard(prep)
    shard.with_suffix(".bin").unlink()
    shard.with_suffix(".idx").unlink()


def _truncated_bin(prep: Path) -> None:
    path = _train_shard(prep).with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-101])


def _corrupt_idx(prep: Path) -> None:
    path = _train_shard(prep).with_suffix(".idx")
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))


def _ids_outside_the_vocabulary(prep: Path) -> None:
    """Right length, wrong content: every size check passes, the ids are garbage."""
    path = _train_shard(prep).with_suffix(".bin")
    path.write_bytes(b"\xff" * path.stat().st_size)


def _manifest_counts_off(prep: Path) -> None:
    def edit(manifest):
        manifest["splits"]["train"]["shards"][0]["num_tokens"] += 1

    _edit_manifest(prep, edit)


def _another_tokenizer(prep: Path) -> None:
    (prep / "tokenizer.model").write_bytes(b"another tokenizer" * 100)


def _smaller_than_one_batch(prep: Path) -> None:
    """200 training tokens: 3 patch windows of 68 tokens, where a global batch takes 4."""
    shard = _train_shard(prep)
    tokens = np.array(IndexedDataset(shard).tokens[:200])
    writer = IndexedDatasetWriter(shard, tokens.dtype)
    writer.add_document(tokens)
    writer.close()

    def edit(manifest):
        split = manifest["splits"]["train"]
        split["shards"] = [{**split["shards"][0], "num_tokens": 200, "num_documents": 1}]
        split["num_tokens"], split["num_documents"] = 200, 1

    _edit_manifest(prep, edit)


# (id, how the data is damaged, what the one line must say); the shard is train-00000
DATA_ROWS = [
    ("missing-shard", _missing_shard, ["train-00000.idx: missing shard index"]),
    ("truncated-bin", _truncated_bin, ["train-00000.bin: truncated:", "the index says"]),
    ("corrupt-idx", _corrupt_idx, ["train-00000.idx: not a megapatch shard index (wrong magic"]),
    (
        "ids-outside-vocabulary",
        _ids_outside_the_vocabulary,
        ["hold id 65535, outside the vocabulary of 400 in its manifest", "re-run megapatch prep"],
    ),
    ("manifest-mismatch", _manifest_counts_off, ["train-00000.idx: holds", "manifest.json says"]),
    (
        "tokenizer-mismatch",
        _another_tokenizer,
        ["tokenizer.model: sha256", "the shards were made with another tokenizer"],
    ),
    (
        "smaller-than-one-batch",
        _smaller_than_one_batch,
        ["the patch phase has 3 windows of 68 tokens, fewer than one global batch of 4"],
    ),
]


def _refused(proc, expected: list[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    for text in expected:
        assert text in line, line
    assert "Traceback" not in proc.stderr
    assert_no_megapatch_traceback(proc.stderr)
    return line


@pytest.mark.parametrize(
    "damage, expected", [r[1:] for r in DATA_ROWS], ids=[r[0] for r in DATA_ROWS]
)
def test_bad_data_is_one_clear_line(tiny_corpus, tmp_path, damage, expected):
    prep = tmp_path / "prep"
    shutil.copytree(tiny_corpus, prep)
    damage(prep)
    run_dir = tmp_path / "run"
    _refused(run_train(tiny_corpus, run_dir, f"data.path={prep}", check=False), expected)
    assert checkpoint_dirs(run_dir) == {}


# -- checkpoints ------------------------------------------------------------------------


@pytest.fixture
def source(reference_dp2):
    """A complete checkpoint of the DP=2 reference run, and its files' digest."""
    path = step_dir(reference_dp2, 3)
    return path, tree_digest(path)


def _resume_refused(tiny_corpus, tmp_path, resume, expected, *overrides, nproc=1):
    run_dir = tmp_path / "run"
    proc = run_train(
        tiny_corpus, run_dir, f"train.resume={resume}", *overrides, nproc=nproc, check=False
    )
    if nproc == 1:
        line = _refused(proc, expected)
    else:  # under torchrun: each rank says it; torchrun adds its own summary
        assert proc.returncode != 0
        line = error_line_of_rank0(proc)
        assert all(text in line for text in expected), line
        assert_no_megapatch_traceback(proc.stderr)
    assert checkpoint_dirs(run_dir) == {}
    return line


def error_line_of_rank0(proc) -> str:
    lines = [
        line for line in proc.stderr.splitlines() if line.startswith("megapatch train: error:")
    ]
    assert lines and len(set(lines)) == 1, proc.stderr[-3000:]  # every rank, the same line
    return lines[0]


def test_resume_from_a_missing_path(tiny_corpus, tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    _resume_refused(
        tiny_corpus,
        tmp_path,
        missing,
        [f"train.resume={missing}: {missing}: no such directory", "step_XXXXXXXX checkpoint"],
    )


def test_resume_from_a_directory_that_holds_no_checkpoint(tiny_corpus, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README").write_text("not a checkpoint\n")
    _resume_refused(tiny_corpus, tmp_path, other, [f"{other}: no complete checkpoint in {other}"])
    assert (other / "README").read_text() == "not a checkpoint\n"


def test_resume_a_checkpoint_of_another_model_shape(tiny_corpus, tmp_path, source):
    path, digest = source
    line = _resume_refused(
        tiny_corpus,
        tmp_path,
        path,
        [f"checkpoint {path} holds a different model: model.d_model=32 there, 64 here"],
        "model.d_model=64",
    )
    assert "resume it with the config it was trained with" in line
    assert tree_digest(path) == digest


def test_resume_a_checkpoint_of_another_tokenizer(tiny_corpus, tmp_path, source):
    path, digest = source
    prep = tmp_path / "reprepped"
    shutil.copytree(tiny_corpus, prep)
    _another_tokenizer(prep)
    sha = hashlib.sha256((prep / "tokenizer.model").read_bytes()).hexdigest()
    _edit_manifest(prep, lambda m: m["tokenizer"].update(sha256=sha))
    _resume_refused(
        tiny_corpus,
        tmp_path,
        path,
        [
            "was trained on data of tokenizer sha256",
            "the data was re-prepped with another tokenizer",
        ],
        f"data.path={prep}",
    )
    assert tree_digest(path) == digest
