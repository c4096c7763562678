"""Progress on a terminal (a bar) and off one (plain lines at the logging interval)."""

from __future__ import annotations

import io
import logging

from megapatch.logging_utils import LOGGER_NAME
from megapatch.training.metrics import ProgressReport


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_a_plain_line_every_interval(caplog):
    report = ProgressReport(enabled=True, total=10, initial=0, interval=4, stream=io.StringIO())
    assert report.bar is None
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = True  # the CLI may have turned it off; caplog listens at the root
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        for step in range(1, 11):
            report.update(step, "patch", 5.0 - step / 10, 1e-3, 1234.5)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]  # and the last
    assert lines[0].startswith("step 4/10 patch loss 4.6000 lr 1.00e-03 1,234 tok/s, ETA ")
    report.close()


def test_on_a_terminal_progress_is_a_bar():
    terminal = _Terminal()
    report = ProgressReport(enabled=True, total=10, initial=2, interval=4, stream=terminal)
    assert report.bar is not None and report.bar.n == 2
    report.update(3, "token", 3.0, 2e-4, 99.0)
    assert report.bar.n == 3 and "token loss 3.0000" in report.bar.postfix
    report.close()


def test_disabled_progress_shows_nothing(caplog):
    report = ProgressReport(enabled=False, total=4, initial=0, interval=1, stream=_Terminal())
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        report.update(1, "patch", 1.0, 1e-3, 1.0)
    assert report.bar is None and not caplog.records
