import logging
import os
from pathlib import Path

import pytest

# Tests are CPU-only and must not touch the network or a wandb account.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), the tests that share
# something expensive run on one worker, so that it is built once and never twice at once:
# the name of a fixture they use -> their group.
ONE_WORKER_GROUPS = {
    "tp2_run": "export-runs",  # tests/export: a 4-process and a 2-process training run
    "zero3_run": "export-runs",
    "reference_dp2": "reference-dp2",  # tests/hardening: the uninterrupted DP=2 run
    "struck_run": "reference-dp2",
    "reference_run": "training-reference",  # tests/training/test_train.py, test_pipeline.py
    "tp2_pp2_run": "training-reference",
    "slurm": "slurm",  # one SLURM test cluster (apt-get, munged, slurmctld, slurmd)
    "kept_gloo_workers": "kept-gloo-workers",  # run_distributed(..., reuse_workers=True)
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        groups = {ONE_WORKER_GROUPS[f] for f in item.fixturenames if f in ONE_WORKER_GROUPS}
        assert len(groups) <= 1, f"{item.nodeid} is in several one-worker groups: {groups}"
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup` pytest-xdist sends a group to one worker by a suffix it adds
    to the node ids; a pytest/xdist pair where that no longer works would silently build
    every shared fixture on both workers (and at once): refuse to run instead."""
    if not session.config.getoption("loadgroup", default=False):  # set on xdist workers only
        return
    lost = [
        i.nodeid
        for i in session.items
        if i.get_closest_marker("xdist_group") and "@" not in i.nodeid
    ]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more) under "
            "--dist loadgroup: this pytest / pytest-xdist pair is incompatible (see pyproject.toml)"
        )


@pytest.fixture
def kept_gloo_workers():
    """Requested by tests that call run_distributed(..., reuse_workers=True): they run on
    one xdist worker, which starts the kept process groups once."""


@pytest.fixture(autouse=True)
def _megapatch_log_handlers_restored():
    """The CLI binds a log handler to the stderr of the moment (capsys's, per test): a
    handler left behind would write to a closed stream in a later test."""
    logger = logging.getLogger("megapatch")
    handlers, propagate = list(logger.handlers), logger.propagate
    yield
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def tiny_corpus_texts(tmp_path_factory) -> Path:
    from tests.fixtures import write_texts

    return write_texts(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="session")
def tiny_corpus(tiny_corpus_texts, tmp_path_factory) -> Path:
    """A real `megapatch prep` output of 12 synthetic documents with a 400-piece
    tokenizer; shared by every test that trains (read-only: copy it to damage it)."""
    from tests.fixtures import prep

    return prep(tiny_corpus_texts, tmp_path_factory.mktemp("tiny-corpus") / "prep")
