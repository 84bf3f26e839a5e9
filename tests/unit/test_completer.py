"""The completer's batching policy, without a database: which outcomes wait for
the producer's next fetch and which are written at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from pgoutbox._job import JobState, Outcome
from pgoutbox._sql import load_statements
from pgoutbox.worker import _completer
from pgoutbox.worker._completer import Completer
from pgoutbox.worker._link import Link

pytestmark = pytest.mark.anyio

WAIT = 5.0
"""Seconds a test waits for the completer to act."""


class RecordingCompleter(Completer):
    """A completer whose writes are recorded instead of sent to a database."""

    def __init__(self, *, capacity: int = 10) -> None:
        super().__init__(Link(lambda: "unused"), load_statements("unit"), capacity=capacity)
        self.batches: list[list[Outcome]] = []
        self._wrote = anyio.Event()

    async def _write(self, batch: list[Outcome]) -> None:
        self.batches.append(batch)
        self._wrote.set()
        self._wrote = anyio.Event()

    async def next_write(self) -> list[Outcome]:
        with anyio.fail_after(WAIT):
            await self._wrote.wait()
        return self.batches[-1]


@asynccontextmanager
async def running(completer: Completer) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(completer.run)
        yield
        completer.close()


def done(job_id: int) -> Outcome:
    return Outcome(job_id, 1, JobState.COMPLETED)


@pytest.fixture
def long_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Completions wait for the fetch longer than any test runs: only the
    policy, never the clock, decides when they are written."""
    monkeypatch.setattr(_completer, "LINGER", WAIT * 10)


async def test_completions_no_fetch_takes_are_written_after_a_while() -> None:
    completer = RecordingCompleter()
    async with running(completer):
        completer.put_nowait(done(1))
        assert await completer.next_write() == [done(1)]


@pytest.mark.usefixtures("long_linger")
async def test_completions_wait_for_the_fetch_and_leave_with_it() -> None:
    completer = RecordingCompleter()
    async with running(completer):
        for job_id in (1, 2, 3):
            assert completer.put_nowait(done(job_id))
        await anyio.wait_all_tasks_blocked()  # the writer looked, and waits
        assert completer.take_completions() == [done(1), done(2), done(3)]
        assert completer.pending == 0
    assert completer.batches == []


@pytest.mark.usefixtures("long_linger")
async def test_flush_soon_writes_waiting_completions_without_lingering() -> None:
    completer = RecordingCompleter()
    async with running(completer):
        completer.flush_soon()  # nothing waits: no effect
        completer.put_nowait(done(1))
        await anyio.wait_all_tasks_blocked()
        assert completer.batches == []
        completer.flush_soon()
        assert await completer.next_write() == [done(1)]
        # The hurry ends with the batch: the next completion waits for a fetch again.
        completer.put_nowait(done(2))
        await anyio.wait_all_tasks_blocked()
        assert completer.take_completions() == [done(2)]
    assert completer.batches == [[done(1)]]


@pytest.mark.usefixtures("long_linger")
async def test_other_outcomes_are_written_at_once_even_while_a_fetch_is_coming() -> None:
    completer = RecordingCompleter()
    failed = Outcome(2, 1, JobState.FAILED, error="{}")
    async with running(completer):
        completer.put_nowait(done(1))
        completer.put_nowait(failed)
        assert await completer.next_write() == [done(1), failed]


async def test_the_fetch_takes_only_completions() -> None:
    completer = RecordingCompleter()
    retry = Outcome(2, 1, JobState.RETRYABLE, delay=1.0, error="{}")
    for outcome in (done(1), retry, done(3)):
        completer.put_nowait(outcome)
    assert completer.take_completions() == [done(1), done(3)]
    assert completer.take_pending() == [retry]


@pytest.mark.usefixtures("long_linger")
async def test_completions_are_written_once_as_many_wait_as_there_are_slots() -> None:
    completer = RecordingCompleter(capacity=3)
    async with running(completer):
        for job_id in (1, 2, 3):
            completer.put_nowait(done(job_id))
        assert await completer.next_write() == [done(1), done(2), done(3)]


async def test_completions_the_fetch_gave_back_are_written_first() -> None:
    completer = RecordingCompleter()
    completer.put_nowait(done(1))
    taken = completer.take_completions()
    completer.put_nowait(done(2))
    completer.give_back(taken)
    assert completer.take_completions() == [done(1), done(2)]


async def test_a_full_completer_refuses_and_makes_putters_wait() -> None:
    completer = RecordingCompleter(capacity=2)
    assert completer.put_nowait(done(1))
    assert completer.put_nowait(done(2))
    assert not completer.put_nowait(done(3))
    async with anyio.create_task_group() as tg:
        tg.start_soon(completer.put, done(3))
        await anyio.wait_all_tasks_blocked()
        assert completer.pending == 2  # waiting for room
        assert completer.take_completions() == [done(1), done(2)]
    assert completer.take_completions() == [done(3)]


class StuckCompleter(RecordingCompleter):
    """A completer whose writes never end, as a write blocked on a row lock."""

    async def _write(self, batch: list[Outcome]) -> None:
        await super()._write(batch)
        await anyio.sleep_forever()


async def test_a_batch_whose_write_was_cancelled_is_handed_out_again() -> None:
    # The worker stopping at once cancels the write; the worker's last flush
    # must still see that batch, or jobs that ran would go back to the queue.
    completer = StuckCompleter()
    retry = Outcome(2, 1, JobState.RETRYABLE, delay=1.0)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(completer.run)
            completer.put_nowait(retry)
            assert await completer.next_write() == [retry]
            completer.put_nowait(done(3))
            scope.cancel()
    assert completer.take_pending() == [retry, done(3)]
    assert completer.take_pending() == []
