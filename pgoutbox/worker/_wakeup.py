"""A reusable wake-up signal between worker services."""

from __future__ import annotations

import math

import anyio

__all__ = ["Wakeup"]


class Wakeup:
    """Set by anyone, consumed by one waiter: "something may have changed, look again".

    A `set` before `wait` is not lost; many sets before one wait count once.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        """Wake the waiter (now, or at its next `wait`)."""
        self._event.set()

    def is_set(self) -> bool:
        """Whether a wake-up is pending."""
        return self._event.is_set()

    async def wait(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109 (returns whether woken)
        """Wait up to `timeout` seconds for a wake-up and consume it; True if one came."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        if self._event.is_set():
            self._event = anyio.Event()
            return True
        return False
