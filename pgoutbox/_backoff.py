"""Exponential backoff with jitter, for reconnecting after database errors."""

from __future__ import annotations

import random
from typing import Final

__all__ = ["Backoff"]

DEFAULT_INITIAL_INTERVAL: Final = 0.1
DEFAULT_MAX_INTERVAL: Final = 30.0


class Backoff:
    """Successive waits that double up to a cap, each drawn from [half, full] of its step.

    The jitter keeps many workers that lost the database together from
    reconnecting together.
    """

    __slots__ = ("_failures", "initial_interval", "max_interval")

    def __init__(
        self,
        initial_interval: float = DEFAULT_INITIAL_INTERVAL,
        max_interval: float = DEFAULT_MAX_INTERVAL,
    ) -> None:
        self.initial_interval = initial_interval
        self.max_interval = max_interval
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures since the last `reset`."""
        return self._failures

    def next_interval(self) -> float:
        """Record a failure and return how long to wait before trying again."""
        self._failures += 1
        step = min(self.max_interval, self.initial_interval * 2 ** (self._failures - 1))
        return random.uniform(step / 2, step)  # noqa: S311 (jitter, not crypto)

    def reset(self) -> None:
        """Forget past failures after a success."""
        self._failures = 0
