"""When a run saves a checkpoint, and what a failed save means.

Saves: every `checkpoint.interval` steps, at the end of every patch stage (each switch,
`checkpoint.at_switch`), and at every stop (end, max_steps, preemption: "final" saves).
Never inside a streak of non-finite losses: such a state must not become the latest.

A periodic save that fails is logged loudly and retried at the next save point: training
goes on, its state still in memory, unless more than `checkpoint.max_failed_saves` saves
failed in a row. A failed final save stops the run with the error: nothing later could
save it. Every rank takes the same branch: CheckpointManager.save raises on all ranks when
any rank failed, so the counts, and the decision to stop, agree without a collective.
"""

from __future__ import annotations

from megapatch.checkpoint.manager import CheckpointInfo, CheckpointWriteError
from megapatch.logging_utils import get_logger

log = get_logger("checkpoint")


class SavePolicy:
    def __init__(self, section, *, last_step: int, checkpoint_dir):
        """`section`: the run config's `checkpoint` section; `last_step`: the global step
        the run ends at (plan.steps_to_run)."""
        self.interval = section.interval
        self.at_switch = section.at_switch
        self.max_failed_saves = section.max_failed_saves
        self.last_step = last_step
        self.dir = checkpoint_dir
        self.failed_saves = 0  # in this process, for summary.json
        self.failed_in_a_row = 0

    def due(self, step: int, *, phase_name: str, at_phase_end: bool, nonfinite_streak: int):
        """Why a checkpoint is due after `step` ("interval", "switch"), or None."""
        if nonfinite_streak:
            return None
        if self.interval and step % self.interval == 0:
            return "interval"
        if at_phase_end and phase_name != "token" and self.at_switch:  # every switch
            return "switch"
        return None

    def saved(self) -> None:
        self.failed_in_a_row = 0

    def failed(
        self,
        exc: CheckpointWriteError,
        *,
        step: int,
        reason: str,
        final: bool,
        latest: CheckpointInfo | None,
    ) -> None:
        """A save failed: raise if the run must stop, else log and go on."""
        self.failed_saves += 1
        self.failed_in_a_row += 1
        since = latest.tag if latest else "the start of the run"
        if final:
            raise CheckpointWriteError(
                f"{exc}; this was the {reason} checkpoint, so training since {since} is lost: "
                f"free space in (or fix) {self.dir}, then rerun with train.resume=auto"
            ) from None
        limit = self.max_failed_saves
        # At the run's last step the final save follows at once and reports its own failure.
        more_training = step < self.last_step
        if limit is not None and self.failed_in_a_row > limit and more_training:
            failures = self.failed_in_a_row
            raise CheckpointWriteError(
                f"{failures} checkpoint save{'s' if failures > 1 else ''} failed in a row "
                f"(checkpoint.max_failed_saves={limit}), the last: {exc}; stopped after step "
                f"{step}, the last good checkpoint is {latest.path if latest else 'none'} "
                f"(training since {since} is lost): free space in (or fix) {self.dir}, "
                "then rerun with train.resume=auto"
            ) from None
        log.error(
            "%s; training goes on and the next save point retries (%d failed in a row, "
            "checkpoint.max_failed_saves=%s; until one succeeds, training since %s exists "
            "only in memory)",
            exc,
            self.failed_in_a_row,
            "null" if limit is None else limit,
            since,
        )
