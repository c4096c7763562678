"""Real tiny training runs of the `tiny_corpus` fixture (tests/conftest.py), shared by
the export, eval and generate tests.

Two runs of the same config (so the same weights up to float rounding: the batch order
does not depend on the layout, and TP=n equals TP=1), patch phase then token phase:

- `tp2_run`: TP=2 x DP=2, ZeRO-2 (four processes): TP shards to merge.
- `zero3_run`: TP=1 x DP=2, ZeRO-3 (two processes): partitioned weights to gather.

Each takes about a minute on two busy cores; everything else here is fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import REPO, prep, run_cli, spawned_training_env

# GQA, a non-default RoPE base and norm epsilon: config.json must carry all of them.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=64",
    "model.seq_len=16",
    "model.rope_theta=500000",
    "model.norm_eps=1e-6",
    "train.tokens_per_step=512",
    "train.total_tokens=3072",  # 4 patch steps (K=4), then 2 token steps
    "train.micro_batch_size=8",
    "train.warmup_steps=1",  # shorter than the 2-step token phase (a longer one is refused)
    "train.precision=fp32",
    "checkpoint.interval=0",  # saved at the switch and at the end
    "eval.interval=0",
    "eval.max_windows=32",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
    "data.num_workers=1",
]
EVAL_WINDOWS = 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores; the models are tiny
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def cli(capsys):
    """run_cli after dropping what was printed before (fixture set-up), so a test's
    capsys holds only the command's own output."""

    def call(*argv) -> int:
        capsys.readouterr()
        return run_cli(*argv)

    return call


@pytest.fixture(scope="session")
def other_corpus(tiny_corpus_texts, tmp_path_factory) -> Path:
    """The texts of `tiny_corpus` prepped with a 450-piece tokenizer: the wrong vocabulary."""
    return prep(tiny_corpus_texts, tmp_path_factory.mktemp("prep450") / "data", vocab_size=450)


def train(corpus: Path, run_dir: Path, *overrides: str, nproc: int) -> Path:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "megapatch", "train", str(REPO / "configs" / "tiny.yaml"), *TINY,
        f"data.path={corpus}", f"run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    env = spawned_training_env(*overrides)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"training {run_dir} failed:\n{done.stderr[-3000:]}"
    return run_dir


@pytest.fixture(scope="session")
def tp2_run(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tp2"
    return train(
        tiny_corpus,
        run_dir,
        "parallel.tensor_model_parallel_size=2",
        "parallel.zero_stage=2",
        nproc=4,
    )


@pytest.fixture(scope="session")
def zero3_run(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "zero3"
    return train(tiny_corpus, run_dir, "parallel.zero_stage=3", nproc=2)


def one_error_line(err: str, command: str, *fragments: str) -> str:
    """The command's error: exactly one line (progress logs may precede it), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"megapatch {command}: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
