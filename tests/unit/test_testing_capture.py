"""pgoutbox.testing.capture: the in-memory mode for users' own tests (no database)."""

from __future__ import annotations

from typing import Any

import msgspec
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


async def test_capture_keeps_cancel_and_get_job_away_from_the_database() -> None:
    # Captured ids start at 1, like real ones: a cancel or a lookup by such an
    # id must not reach the database, where it would be another job.
    queue = _queue()

    @queue.task
    async def send(i: int) -> None: ...

    with capture(queue) as jobs:
        first = await queue.enqueue(NO_CONNECTION, send, 1)
        await queue.enqueue(NO_CONNECTION, send, 2)
        result = await queue.cancel(NO_CONNECTION, first.id, 99)
        with pytest.raises(pgoutbox.PgoutboxError, match="captured"):
            await queue.get_job(first.id)
        await jobs.run_all()
    assert result == pgoutbox.CancelResult(cancelled=(first.id,), requested=())
    assert jobs.states() == {"cancelled": 1, "completed": 1}


async def test_capture_gives_delayed_jobs_their_due_time_and_handlers_their_headers() -> None:
    queue = _queue()
    seen: list[dict[str, str]] = []

    @queue.task
    async def send(i: int) -> None:
        seen.append(current_job().headers)

    spec = send.options(delay=3600).bind(1)
    with capture(queue) as jobs:
        job = await queue.enqueue(NO_CONNECTION, send.options(delay=3600), 1)
        await queue.enqueue_many(
            NO_CONNECTION,
            [pgoutbox.JobSpec(**{**msgspec.structs.asdict(spec), "headers": {"k": "v"}})],
        )
        await jobs.run_all()
    captured = jobs.enqueued()[0]
    assert job.run_at == captured.run_at
    assert (captured.run_at - captured.created_at).total_seconds() == 3600
    assert seen == [{}, {"k": "v"}]


async def test_capture_keeps_one_unfinished_job_per_key() -> None:
    queue = _queue()
    ran: list[int] = []

    @queue.task
    async def charge(order_id: int) -> None:
        ran.append(order_id)

    keyed = charge.options(key="charge:7")
    with capture(queue) as jobs:
        first = await queue.enqueue(NO_CONNECTION, keyed, 1)
        again = await queue.enqueue(NO_CONNECTION, keyed, 2)
        [batched] = await queue.enqueue_many(NO_CONNECTION, [keyed.bind(3)])
        await jobs.run_all()
        after = await queue.enqueue(NO_CONNECTION, keyed, 4)  # the first one finished
    assert not first.duplicate
    assert (again.id, again.duplicate) == (first.id, True)
    assert (batched.id, batched.duplicate) == (first.id, True)
    assert ran == [1]
    assert not after.duplicate
    assert after.id != first.id
