"""Every way a job becomes due wakes an idle worker: it never waits for a poll.

The workers here poll once an hour, so a job that starts at all was woken for.
Each test first lets the worker go idle (it ran a job, and no fetch is
coming), so a job that becomes due afterwards is seen only if something wakes
the worker: a NOTIFY, or the worker's own outcome that leaves a job to run
again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from psycopg import sql

import pgoutbox
from pgoutbox import JobState, Queue, Retry, RetryPolicy, Snooze, Worker, current_job
from pgoutbox.instrumentation import Instrumentation, combine

from ._running import WAIT_TIMEOUT, Recorder, running, watching_logs

pytestmark = pytest.mark.anyio

NEVER = 3600.0
"""A poll interval no test waits for."""


class _Listening(Instrumentation):
    """Sets `up` once a worker's LISTEN is in place."""

    def __init__(self) -> None:
        self.up = anyio.Event()

    def listening_changed(self, listening: bool) -> None:
        if listening:
            self.up.set()


def _listening(queue: Queue, seen: Recorder | None = None) -> _Listening:
    """Watch `queue`'s workers LISTEN; with `seen`, register the task `_idle` runs
    (before the worker is made: a worker runs the tasks registered by then)."""
    listening = _Listening()
    queue.instrumentation = combine([listening])
    if seen is not None:

        @queue.task(name="wakeups.first")
        async def first() -> None:
            seen.record("first")

    return listening


async def _idle(queue: Queue, listening: _Listening, seen: Recorder) -> None:
    """Run one job through a running worker, once its LISTEN is in place: the
    worker is then idle, and fetches again only when woken."""
    with anyio.fail_after(WAIT_TIMEOUT):
        await listening.up.wait()
    expected = len(seen.calls) + 1  # counted first: the job may run before enqueue returns
    async with queue.connection() as conn:
        await queue.enqueue(conn, "wakeups.first")
    await seen.wait_for(expected)


@pytest.mark.parametrize("how", ["delay", "run_at"])
async def test_an_idle_worker_starts_a_job_due_in_a_moment(
    queue: Queue, conn: pgoutbox.Connection[Any], how: str
) -> None:
    seen = Recorder()
    listening = _listening(queue, seen)

    @queue.task
    async def soon(i: int) -> None:
        seen.record(i)

    # Two slots: a fetch that fills every slot fetches again at once.
    worker = Worker(queue, poll_interval=NEVER, concurrency=2)
    async with running(worker):
        await _idle(queue, listening, seen)
        task = (
            soon.options(delay=0.05)
            if how == "delay"
            else soon.options(run_at=datetime.now(UTC) + timedelta(seconds=0.05))
        )
        async with conn.transaction():
            await queue.enqueue(conn, task, 1)
        assert await seen.wait_for(2) == ["first", 1]


async def test_an_idle_worker_starts_a_job_due_in_a_moment_from_enqueue_many(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()
    listening = _listening(queue, seen)

    @queue.task
    async def soon(i: int) -> None:
        seen.record(i)

    worker = Worker(queue, poll_interval=NEVER, concurrency=2)
    async with running(worker):
        await _idle(queue, listening, seen)
        async with conn.transaction():
            await queue.enqueue_many(conn, [soon.options(delay=0.05).bind(i) for i in (1, 2)])
        assert sorted((await seen.wait_for(3))[1:]) == [1, 2]


@pytest.mark.parametrize(
    "signal",
    [Retry(after=0.05), Retry(after=0), Snooze(0.05)],
    ids=["retry-after-a-moment", "retry-at-once", "snooze"],
)
async def test_an_idle_worker_runs_its_own_retry_when_it_is_due(
    queue: Queue, conn: pgoutbox.Connection[Any], signal: Exception
) -> None:
    seen = Recorder()
    listening = _listening(queue, seen)

    @queue.task(retry=RetryPolicy(max_attempts=3))
    async def flaky(i: int) -> None:
        seen.record(current_job().attempt)
        if len(seen.calls) == 2:
            raise signal

    worker = Worker(queue, poll_interval=NEVER, concurrency=2)
    async with running(worker):
        await _idle(queue, listening, seen)
        async with conn.transaction():
            job = await queue.enqueue(conn, flaky, 1)
        calls = await seen.wait_for(3)
    assert calls[1:] == [1, 2]
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is JobState.COMPLETED


async def test_jobs_a_stopping_worker_gives_back_start_at_once_on_another(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()
    listening = _listening(queue)
    first_run = True

    async def slow(i: int) -> None:
        nonlocal first_run
        seen.record(i)
        if first_run:  # cut short when its worker stops
            first_run = False
            await anyio.sleep_forever()

    queue.task(name="wakeups.slow")(slow)
    leaving = Worker(queue, poll_interval=NEVER, shutdown_timeout=0.05)
    # The same task in a second queue object, for the worker that stays; built
    # after `leaving`, which therefore does not run the job that makes it idle.
    others = Queue(queue.conninfo, schema=queue.schema)
    others_listening = _listening(others, seen)
    others.task(name="wakeups.slow")(slow)
    stays = Worker(others, poll_interval=NEVER, concurrency=2)
    left = anyio.Event()

    async def leave_after_running() -> None:
        try:
            await leaving.run()
        finally:
            left.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_after_running)
            with anyio.fail_after(WAIT_TIMEOUT):
                await listening.up.wait()
            async with conn.transaction():
                await queue.enqueue(conn, "wakeups.slow", i=1)
            await seen.wait_for(1)
            async with running(stays):
                await _idle(others, others_listening, seen)
                leaving.stop()
                with anyio.fail_after(WAIT_TIMEOUT):
                    await left.wait()
                assert await seen.wait_for(3) == [1, "first", 1]
    finally:
        await others.aclose()


async def test_jobs_rescued_from_a_dead_worker_start_at_once(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()
    listening = _listening(queue, seen)

    @queue.task
    async def work(i: int) -> None:
        seen.record(current_job().attempt)

    worker = Worker(
        queue,
        poll_interval=NEVER,
        concurrency=2,
        heartbeat_interval=0.1,
        maintenance_interval=0.1,
    )
    with watching_logs() as logs:
        async with running(worker):
            await _idle(queue, listening, seen)
            # A job that was running under a worker whose heartbeat stopped an hour ago.
            dead = str(uuid.uuid4())
            async with conn.transaction():
                job = await queue.enqueue(conn, work, 1)
                await _run_under(conn, queue, job.id, dead)
            await logs.wait_for_event("worker.rescued")
            assert await seen.wait_for(2) == ["first", 2]


async def _run_under(
    conn: pgoutbox.Connection[Any], queue: Queue, job_id: int, worker_id: str
) -> None:
    """Make the job `running` (attempt 1) under a worker whose heartbeat expired an hour ago."""
    schema = sql.Identifier(queue.schema)
    await conn.execute(
        sql.SQL(
            "INSERT INTO {}.workers (id, hostname, pid, queues, tasks, concurrency, "
            "heartbeat_at, heartbeat_timeout) VALUES (%s, 'gone', 1, '{{default}}', '{{}}', 1, "
            "now() - interval '1 hour', 30)"
        ).format(schema),
        [worker_id],
    )
    await conn.execute(
        sql.SQL(
            "UPDATE {}.jobs SET state = 'running', attempt = 1, worker_id = %s WHERE id = %s"
        ).format(schema),
        [worker_id, job_id],
    )
