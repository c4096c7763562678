import logging
import os
from pathlib import Path

import pytest

# Tests are CPU-only and must not touch the network or a wandb account.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
