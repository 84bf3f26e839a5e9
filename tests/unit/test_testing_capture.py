"""pgoutbox.testing.capture: the in-memory mode for users' own tests (no database)."""

from __future__ import annotations

from typing import Any

import pytest

import pgoutbox
from pgoutbox import Discard, JobState, PayloadError, Queue, RetryPolicy, Snooze, current_job
from pgoutbox.testing import capture

pytestmark = pytest.mark.anyio

NO_CONNECTION: Any = None
"""What the code under test passes as its connection: capture ignores it."""


def _queue() -> Queue:
    return Queue("", schema="unit")


async def test_capture_records_and_asserts_enqueued() -> None:
    queue = _queue()

    @queue.task
    async def send(user_id: int, email: str, vip: bool = False) -> None: ...

    with capture(queue) as jobs:
        job = await queue.enqueue(NO_CONNECTION, send, 1, "ada@example.com")
        await queue.enqueue(NO_CONNECTION, "other.task", x=1)
        with pytest.raises(PayloadError):
            await queue.enqueue(NO_CONNECTION, send, "one", "x")  # type: ignore[arg-type]
    assert job.id == 1
    found = jobs.assert_enqueued(send, user_id=1, email="ada@example.com")
    assert found.args == {"user_id": 1, "email": "ada@example.com", "vip": False}
    jobs.assert_enqueued(send)
    jobs.assert_enqueued("other.task", x=1)
    with pytest.raises(AssertionError, match="no job of"):
        jobs.assert_enqueued(send, 2, "bob@example.com")
    assert queue._capture is None


async def test_capture_run_all_runs_nested_jobs_retries_and_signals() -> None:
    queue = _queue()
    log: list[str] = []

    @queue.task(retry=RetryPolicy(max_attempts=2))
    async def flaky(n: int) -> None:
        log.append(f"flaky{current_job().attempt}")
        if current_job().attempt == 1:
            raise ValueError("once")
        await queue.enqueue(NO_CONNECTION, child, n + 1)

    @queue.task
    async def child(n: int) -> None:
        log.append(f"child{n}")

    @queue.task
    async def sleepy() -> None:
        log.append("sleepy")
        if log.count("sleepy") < 3:
            raise Snooze(60)

    @queue.task
    async def doomed() -> None:
        raise Discard("no")

    with capture(queue) as jobs:
        await queue.enqueue(NO_CONNECTION, flaky, 1)
        await queue.enqueue(NO_CONNECTION, sleepy)
        await queue.enqueue(NO_CONNECTION, doomed)
        await queue.enqueue(NO_CONNECTION, "unknown.task")
        await jobs.run_all()
    assert log.count("child2") == 1
    assert log.index("flaky1") < log.index("flaky2") < log.index("child2")
    assert jobs.states() == {"completed": 3, "failed": 1, "available": 1}
    (failed,) = [j for j in jobs.jobs if j.state is JobState.FAILED]
    assert failed.errors[0].type == "pgoutbox.signals.Discard"
    (flaky_job,) = jobs.enqueued(flaky)
    assert (flaky_job.attempt, len(flaky_job.errors)) == (2, 1)


async def test_capture_refuses_job_transactions_and_endless_loops() -> None:
    queue = _queue()

    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def transactional() -> None:
        async with current_job().transaction():
            pass

    @queue.task
    async def forever() -> None:
        raise Snooze(0)

    with capture(queue) as jobs:
        await queue.enqueue(NO_CONNECTION, transactional)
        await jobs.run_all()
        (job,) = jobs.jobs
        assert job.state is JobState.FAILED
        assert "needs the database" in job.errors[0].message
        await queue.enqueue(NO_CONNECTION, forever)
        with pytest.raises(pgoutbox.PgoutboxError, match="still waiting"):
            await jobs.run_all(max_rounds=5)
