"""Reconnect backoff."""

from __future__ import annotations

from pgoutbox._backoff import Backoff


def test_backoff_doubles_with_jitter_and_caps() -> None:
    backoff = Backoff(initial_interval=1, max_interval=8)
    waits = [backoff.next_interval() for _ in range(6)]
    for wait, step in zip(waits, [1, 2, 4, 8, 8, 8], strict=True):
        assert step / 2 <= wait <= step
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_interval() <= 1
