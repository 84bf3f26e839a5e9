"""The worker against a real PostgreSQL: delivery, wake-ups, outcomes, shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio
import msgspec
import psycopg
import pytest

import pgoutbox
from pgoutbox import JobState, Queue, RetryPolicy, Worker, _store
from pgoutbox.worker import _listener

from ._running import WAIT_TIMEOUT, Recorder, count_jobs, running, watching_logs

pytestmark = pytest.mark.anyio

NEVER = 3600.0
"""A poll interval no test waits for: only a NOTIFY can wake such a worker."""


class Address(msgspec.Struct):
    city: str
    zip: str


@dataclass
class Line:
    sku: str
    qty: int


async def test_worker_runs_committed_job_with_typed_args(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def ship(
        order_id: int, amount: Decimal, when: datetime, to: Address, lines: list[Line]
    ) -> None:
        seen.record((order_id, amount, when, to, lines))

    when = datetime.fromisoformat("2026-11-25T10:00:00+00:00")
    async with running(Worker(queue, poll_interval=NEVER)):
        async with conn.transaction():
            await queue.enqueue(
                conn, ship, 7, Decimal("9.99"), when, Address("Oslo", "0150"), [Line("a", 2)]
            )
        (call,) = await seen.wait_for(1)
    assert call == (7, Decimal("9.99"), when, Address("Oslo", "0150"), [Line("a", 2)])
    assert isinstance(call[1], Decimal)
    assert await count_jobs(queue, "state = 'completed'") == 1


async def test_worker_rolled_back_job_never_runs(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    async with running(Worker(queue, poll_interval=0.05)):
        with pytest.raises(RuntimeError, match="roll back"):
            await _enqueue_then_fail(queue, conn, work, 1)
        async with conn.transaction():
            await queue.enqueue(conn, work, 2)
        await seen.wait_for(1)
        # The worker polled many times by now; job 1 never existed.
        await seen.wait_for(1)
    assert seen.calls == [2]
    assert await count_jobs(queue) == 1


async def _enqueue_then_fail(
    queue: Queue, conn: pgoutbox.Connection[Any], task: pgoutbox.Task[[int], None], i: int
) -> None:
    async with conn.transaction():
        await queue.enqueue(conn, task, i)
        raise RuntimeError("roll back")


async def test_worker_notify_wakes_idle_worker_before_any_poll(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    worker = Worker(queue, poll_interval=NEVER)
    async with running(worker):
        for i in range(3):  # each one must be woken by its own NOTIFY
            await _wait_listening(worker)
            async with conn.transaction():
                await queue.enqueue(conn, work, i)
            await seen.wait_for(i + 1)
    assert seen.calls == [0, 1, 2]


async def _wait_listening(worker: Worker) -> None:
    with anyio.fail_after(WAIT_TIMEOUT):
        await worker.wait_listening()


async def test_worker_uses_one_persistent_fetch_connection(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    worker = Worker(queue, poll_interval=0.05, concurrency=2)
    async with running(worker):
        for i in range(6):
            async with conn.transaction():
                await queue.enqueue(conn, work, i)
            await seen.wait_for(i + 1)
    stats = worker.statistics()
    assert stats.fetches >= 6
    assert len(stats.fetch_connection_pids) == 1
    assert len(stats.listen_connection_pids) == 1
    assert stats.fetch_connection_pids != stats.listen_connection_pids


async def test_worker_polls_when_listen_fails(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(conn: object, channel: str) -> None:
        raise psycopg.OperationalError("LISTEN refused (simulated)")

    monkeypatch.setattr(_listener._store, "listen", refuse)
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    worker = Worker(queue, poll_interval=0.1)
    with watching_logs() as logs:
        async with running(worker):
            for i in range(3):
                async with conn.transaction():
                    await queue.enqueue(conn, work, i)
                await seen.wait_for(i + 1)
            assert not worker.statistics().listening
    assert logs.events().count("listener.unavailable") == 1


async def _terminate(admin: pgoutbox.Connection[Any], pids: list[int]) -> None:
    await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])


async def test_worker_recovers_after_backends_terminated(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    worker = Worker(queue, poll_interval=0.2)
    async with running(worker), await pgoutbox.connect(database_dsn, autocommit=True) as admin:
        async with conn.transaction():
            await queue.enqueue(conn, work, 0)
        await seen.wait_for(1)
        await _wait_listening(worker)
        before = worker.statistics()
        await _terminate(
            admin, [*before.fetch_connection_pids[-1:], *before.listen_connection_pids[-1:]]
        )
        for i in range(1, 4):
            async with conn.transaction():
                await queue.enqueue(conn, work, i)
        await seen.wait_for(4)
        await _wait_listening(worker)
        after = worker.statistics()
    assert sorted(seen.calls) == [0, 1, 2, 3]
    assert len(after.fetch_connection_pids) == 2
    assert len(after.listen_connection_pids) >= 2
    assert await count_jobs(queue, "state = 'completed'") == 4


async def test_worker_retries_failed_attempt_with_history(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0))
    async def flaky(i: int) -> None:
        seen.record(i)
        if len(seen.calls) < 2:
            raise ValueError("first attempt fails")

    async with running(Worker(queue, poll_interval=0.05)):
        async with conn.transaction():
            job = await queue.enqueue(conn, flaky, 1)
        await seen.wait_for(2)
    record = await queue.get_job(job.id)
    assert record is not None
    assert (record.state, record.attempt) == (JobState.COMPLETED, 2)
    (error,) = record.errors
    assert (error.attempt, error.type, error.message) == (
        1,
        "builtins.ValueError",
        "first attempt fails",
    )
    assert error.traceback is not None
    assert "first attempt fails" in error.traceback


async def test_worker_fails_job_when_attempts_run_out(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
    async def broken(i: int) -> None:
        seen.record(i)
        raise KeyError("nope")

    async with running(Worker(queue, poll_interval=0.05)):
        async with conn.transaction():
            job = await queue.enqueue(conn, broken, 1)
        await seen.wait_for(2)
    record = await queue.get_job(job.id)
    assert record is not None
    assert (record.state, record.attempt, len(record.errors)) == (JobState.FAILED, 2, 2)
    assert record.finished_at is not None


async def test_worker_timeout_cancels_handler_and_counts_attempt(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    started = Recorder()
    finished = Recorder()

    @queue.task(timeout=0.2, retry=RetryPolicy(max_attempts=1))
    async def slow(i: int) -> None:
        started.record(i)
        await anyio.sleep(NEVER)
        finished.record(i)

    async with running(Worker(queue, poll_interval=0.05)):
        async with conn.transaction():
            job = await queue.enqueue(conn, slow, 1)
        await started.wait_for(1)
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is JobState.FAILED
    assert "timeout" in record.errors[0].message
    assert finished.calls == []


async def test_worker_graceful_stop_lets_running_job_finish(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    started = Recorder()
    release = anyio.Event()

    @queue.task
    async def work(i: int) -> None:
        started.record(i)
        await release.wait()

    worker = Worker(queue, poll_interval=0.05, shutdown_timeout=NEVER)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with conn.transaction():
            job = await queue.enqueue(conn, work, 1)
        await started.wait_for(1)
        worker.stop()
        assert worker.statistics().running == 1
        release.set()
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is JobState.COMPLETED


async def test_worker_stop_past_grace_returns_job_to_queue(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    started = Recorder()

    @queue.task
    async def stuck(i: int) -> None:
        started.record(i)
        await anyio.sleep(NEVER)

    worker = Worker(queue, poll_interval=0.05, shutdown_timeout=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with conn.transaction():
            job = await queue.enqueue(conn, stuck, 1)
        await started.wait_for(1)
        worker.stop()
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is JobState.AVAILABLE
    assert record.errors[-1].type.endswith("WorkerShutdownError")
    assert await count_jobs(queue, "worker_id IS NOT NULL") == 0


async def test_worker_cancelled_scope_returns_job_and_closes_everything(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    started = Recorder()

    @queue.task
    async def stuck(i: int) -> None:
        started.record(i)
        await anyio.sleep(NEVER)

    worker = Worker(queue, poll_interval=0.05)
    tasks_before = len(anyio.get_running_tasks())
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            async with conn.transaction():
                job = await queue.enqueue(conn, stuck, 1)
            await started.wait_for(1)
            scope.cancel()
    assert len(anyio.get_running_tasks()) == tasks_before
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is JobState.AVAILABLE
    stats = worker.statistics()
    pids = [*stats.fetch_connection_pids, *stats.listen_connection_pids]
    async with await pgoutbox.connect(database_dsn, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
        )
        assert await cur.fetchone() == (0,)
        cur = await admin.execute(
            f"SELECT count(*) FROM {queue.schema}.workers"  # noqa: S608 (test-owned SQL)
        )
        assert await cur.fetchone() == (0,)


async def test_worker_never_claims_unregistered_task(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def known(i: int) -> None:
        seen.record(i)

    async with running(Worker(queue, poll_interval=0.05)):
        async with conn.transaction():
            stranger = await queue.enqueue(conn, "deployed.tomorrow", i=1)
            await queue.enqueue(conn, known, 2)
        await seen.wait_for(1)
    record = await queue.get_job(stranger.id)
    assert record is not None
    # No worker runs its task: the fetch set it aside, untried, until one does.
    assert (record.state, record.attempt) == (JobState.SCHEDULED, 0)


async def test_worker_reaches_its_jobs_behind_many_of_a_task_nobody_runs(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def known(i: int) -> None:
        seen.record(i)

    # Two slots, 40 jobs ahead that no worker runs, and one NOTIFY for all of
    # them: the worker must keep fetching on its own until it reaches its jobs.
    async with running(Worker(queue, concurrency=2, poll_interval=NEVER)):
        async with conn.transaction():
            for i in range(40):
                await queue.enqueue(conn, "deployed.tomorrow", i=i)
            for i in range(3):
                await queue.enqueue(conn, known, i)
        assert sorted(await seen.wait_for(3)) == [0, 1, 2]
    assert await count_jobs(queue, "task = 'deployed.tomorrow' AND state = 'scheduled'") == 40


async def test_worker_undecodable_payload_fails_job(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task(name="reports.build")
    async def build(year: int) -> None:
        seen.record(year)

    async with running(Worker(queue, poll_interval=0.05)):
        async with conn.transaction():
            # A producer that does not know the task cannot validate the payload.
            producer = Queue(queue.conninfo, schema=queue.schema)
            bad = await producer.enqueue(conn, "reports.build", year="last")
            await queue.enqueue(conn, build, 2026)
        await seen.wait_for(1)
    record = await queue.get_job(bad.id)
    assert record is not None
    assert record.state is JobState.FAILED
    assert "year" in record.errors[0].message


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


async def test_an_exception_jsonb_cannot_hold_fails_its_job_not_the_worker(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    # A NUL character or a lone surrogate in the message, or a __str__ that
    # raises: written as they were, they failed the batch of outcomes and the
    # worker with it, and every worker that took the job after.
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def poison(kind: str) -> None:
        if kind == "nul":
            raise ValueError("before\x00after")
        if kind == "surrogate":
            raise ValueError("before\ud800after")
        raise _UnprintableError

    @queue.task
    async def fine(i: int) -> None:
        seen.record(i)

    with watching_logs() as logs:
        async with running(Worker(queue, poll_interval=0.05)):
            async with conn.transaction():
                poisoned = [await queue.enqueue(conn, poison, k) for k in ("nul", "surrogate", "x")]
                await queue.enqueue(conn, fine, 1)
            await logs.wait_for_event("job.failed", 3)
            await seen.wait_for(1)
    messages = []
    for job in poisoned:
        record = await queue.get_job(job.id)
        assert record is not None
        assert record.state is JobState.FAILED
        messages.append(record.errors[0].message)
    assert messages == [
        "before\N{REPLACEMENT CHARACTER}after",
        "before?after",
        "(the exception's message could not be read: RuntimeError)",
    ]


async def test_worker_runs_delayed_job_when_due(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def later(i: int) -> None:
        seen.record(i)

    # Delayed jobs send no NOTIFY: the worker learns of them at its next poll
    # and then sleeps until the earliest one is due.
    worker = Worker(queue, poll_interval=0.1)
    async with running(worker):
        async with conn.transaction():
            job = await queue.enqueue(conn, later.options(delay=0.3), 1)
        await seen.wait_for(1)
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.attempted_at is not None
    assert record.attempted_at >= record.run_at


async def test_worker_refuses_missing_schema(database_dsn: str) -> None:
    queue = Queue(database_dsn, schema="pgoutbox_never_migrated")

    @queue.task
    async def work(i: int) -> None: ...

    with pytest.raises(pgoutbox.SchemaError, match="migrate"):
        await Worker(queue).run()


async def test_worker_runs_many_jobs_concurrently(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()
    gate = anyio.Event()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)
        await gate.wait()

    async with running(Worker(queue, poll_interval=0.05, concurrency=5)):
        async with conn.transaction():
            for i in range(8):
                await queue.enqueue(conn, work, i)
        await seen.wait_for(5)
        assert len(seen.calls) == 5  # no more than the free slots
        gate.set()
        await seen.wait_for(8)
    assert await count_jobs(queue, "state = 'completed'") == 8


async def test_worker_without_prepared_statements_for_transaction_poolers(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    plain, prepared = (
        Worker(queue, poll_interval=0.05, prepared_statements=False),
        Worker(queue, poll_interval=0.05),
    )
    async with running(plain):
        async with conn.transaction():
            await queue.enqueue_many(conn, [work.bind(i) for i in range(3)])
        await seen.wait_for(3)
        fetch_conn = await plain._link.get()
        assert fetch_conn.prepare_threshold is None
    async with running(prepared):
        assert (await prepared._link.get()).prepare_threshold == 5


async def test_the_listen_session_is_not_ended_for_idleness(database_dsn: str) -> None:
    # A database or role with a short idle_session_timeout (PostgreSQL 14 and
    # later) ended the waiting LISTEN session again and again.
    async with await pgoutbox.connect(
        database_dsn + " options='-c idle_session_timeout=1000'", autocommit=True
    ) as conn:
        await _store.listen(conn, "pgoutbox_idle_test")
        cur = await conn.execute("SHOW idle_session_timeout")
        assert await cur.fetchone() == ("0",)
