"""SIGTERM/SIGUSR1 ask the run to checkpoint and stop at the next step boundary.

The handler only sets a flag (a signal can land mid-collective); the loop agrees across
ranks at the step boundary, saves, and exits. Further signals during the save are
absorbed, so a second SIGTERM cannot corrupt the checkpoint being written.
"""

from __future__ import annotations

import signal

from megapatch.logging_utils import get_logger

log = get_logger("preemption")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionHandler:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning(
                "received %s: will checkpoint and stop after this step", signal.Signals(signum).name
            )
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
