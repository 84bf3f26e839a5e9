"""Signals a handler raises to tell pgoutbox how its attempt ended.

These are not errors of pgoutbox's own (those derive from `PgoutboxError`);
they are how a handler says "not now" or "never"::

    JobSignal
    ├── Retry     this attempt failed; try again (after `after` seconds, if given)
    ├── Snooze    not now; try again after `after` seconds without spending an attempt
    └── Discard   give up: fail the job now, whatever attempts it has left
"""

from __future__ import annotations

from ._task import MAX_DELAY, seconds_in_range

__all__ = ["Discard", "JobSignal", "Retry", "Snooze"]


class JobSignal(Exception):  # noqa: N818 (a signal, not an error)
    """Base of the signals a handler may raise."""


class Retry(JobSignal):
    """This attempt failed: retry the job if it has attempts left.

    Args:
        after: seconds before the retry; None uses the task's retry policy.
        reason: recorded in the job's error history.
    """

    def __init__(self, after: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        if after is not None and not seconds_in_range(after):
            raise ValueError(
                f"Retry(after=...) must be a number of seconds from 0 to {MAX_DELAY:.0f}, "
                f"got {after!r}"
            )
        self.after = None if after is None else float(after)
        self.reason = reason


class Snooze(JobSignal):
    """Not now: run the job again after `after` seconds without spending an attempt.

    Args:
        after: seconds before the job runs again.
    """

    def __init__(self, after: float) -> None:
        super().__init__(f"snoozed for {after} s")
        if not seconds_in_range(after):
            raise ValueError(
                f"Snooze(after=...) must be a number of seconds from 0 to {MAX_DELAY:.0f}, "
                f"got {after!r}"
            )
        self.after = float(after)


class Discard(JobSignal):
    """Give up: the job fails now, whatever attempts it has left.

    Args:
        reason: recorded in the job's error history.
    """

    def __init__(self, reason: str = "discarded by the handler") -> None:
        super().__init__(reason)
        self.reason = reason
