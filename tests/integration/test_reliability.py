"""Signals, cancellation, heartbeats, rescue, fencing and exactly-once completion."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest
from anyio.lowlevel import checkpoint
from psycopg import sql

import pgoutbox
from pgoutbox import (
    Discard,
    JobState,
    Queue,
    Retry,
    RetryPolicy,
    Snooze,
    Worker,
    _store,
    current_job,
)
from pgoutbox._job import ClaimedJob, Outcome
from pgoutbox.worker import _completer, _heartbeat, _link, _listener, _producer
from pgoutbox.worker import _worker as _worker_module
from pgoutbox.worker._heartbeat import Heartbeat
from pgoutbox.worker._vacuum import Vacuumer
from pgoutbox.worker._wakeup import Wakeup

from ._running import WAIT_TIMEOUT, Recorder, count_jobs, running, watching_logs

pytestmark = pytest.mark.anyio

FAST = {"poll_interval": 0.05, "heartbeat_interval": 0.1, "maintenance_interval": 0.1}
"""Worker options that make every loop quick, for tests that wait on them."""


async def _job(queue: Queue, job_id: int) -> pgoutbox.JobRecord:
    record = await queue.get_job(job_id)
    assert record is not None
    return record


async def _execute(queue: Queue, statement: str, *params: object) -> None:
    async with queue.connection() as conn:
        await conn.execute(
            sql.SQL(statement).format(schema=sql.Identifier(queue.schema)), list(params)
        )


async def test_signal_retry_after_and_discard(queue: Queue, conn: pgoutbox.Connection[Any]) -> None:
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=5, retry_on=()))
    async def picky(mode: str) -> None:
        seen.record(mode)
        if mode == "retry" and current_job().attempt == 1:
            raise Retry(after=0.01, reason="upstream busy")
        if mode == "discard":
            raise Discard("order was deleted")

    async with running(Worker(queue, **FAST)):
        async with conn.transaction():
            retried = await queue.enqueue(conn, picky, "retry")
            discarded = await queue.enqueue(conn, picky, "discard")
        await seen.wait_for(3)
    r = await _job(queue, retried.id)
    assert (r.state, r.attempt, r.errors[0].message) == (JobState.COMPLETED, 2, "upstream busy")
    d = await _job(queue, discarded.id)
    assert (d.state, d.attempt, d.errors[0].type) == (
        JobState.FAILED,
        1,
        "pgoutbox.signals.Discard",
    )


async def test_signal_snooze_does_not_spend_an_attempt(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def wait_for_stock(sku: str) -> None:
        seen.record(current_job().attempt)
        if len(seen.calls) < 3:
            raise Snooze(0.01)

    async with running(Worker(queue, **FAST)):
        async with conn.transaction():
            job = await queue.enqueue(conn, wait_for_stock, "a-1")
        await seen.wait_for(3)
    record = await _job(queue, job.id)
    assert record.state is JobState.COMPLETED
    assert record.max_attempts - record.attempt == 1 - 1  # every snooze gave its attempt back
    assert record.errors == ()


async def test_cancel_waiting_job(queue: Queue, conn: pgoutbox.Connection[Any]) -> None:
    @queue.task
    async def never(i: int) -> None: ...

    async with conn.transaction():
        job = await queue.enqueue(conn, never.options(delay=3600), 1)
    async with conn.transaction():
        result = await queue.cancel(conn, job.id, 999_999)
    assert result == pgoutbox.CancelResult(cancelled=(job.id,), requested=())
    record = await _job(queue, job.id)
    assert record.state is JobState.CANCELLED
    assert record.finished_at is not None


@pytest.mark.parametrize("listen", [True, False], ids=["notify", "heartbeat"])
async def test_cancel_running_job_cancels_its_handler(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch, listen: bool
) -> None:
    if not listen:

        async def refuse(conn: object, channel: str) -> None:
            raise psycopg.OperationalError("LISTEN refused (simulated)")

        monkeypatch.setattr(_listener._store, "listen", refuse)
    started = Recorder()
    stopped = Recorder()

    @queue.task
    async def long_report(i: int) -> None:
        started.record(i)
        try:
            await anyio.sleep(WAIT_TIMEOUT * 10)
        finally:
            stopped.record(i)

    async with running(Worker(queue, **FAST)):
        async with conn.transaction():
            job = await queue.enqueue(conn, long_report, 1)
        await started.wait_for(1)
        async with conn.transaction():
            result = await queue.cancel(conn, job.id)
        assert result.requested == (job.id,)
        await stopped.wait_for(1)
    record = await _job(queue, job.id)
    assert record.state is JobState.CANCELLED


async def test_an_executor_runs_its_next_job_after_one_was_cancelled(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """An executor's jobs share a cancel scope: after a cancellation it takes a new one."""
    started = Recorder()
    finished = Recorder()

    @queue.task
    async def step(i: int) -> None:
        started.record(i)
        if i == 1:
            await anyio.sleep(WAIT_TIMEOUT * 10)  # until cancelled
        await checkpoint()
        finished.record(i)

    async with running(Worker(queue, concurrency=1, **FAST)):  # one executor runs both
        async with conn.transaction():
            first = await queue.enqueue(conn, step, 1)
        await started.wait_for(1)
        async with conn.transaction():
            assert (await queue.cancel(conn, first.id)).requested == (first.id,)
            second = await queue.enqueue(conn, step, 2)
        assert await finished.wait_for(1) == [2]
    assert (await _job(queue, first.id)).state is JobState.CANCELLED
    assert (await _job(queue, second.id)).state is JobState.COMPLETED


async def test_a_cancel_that_comes_after_the_handler_returned_spares_the_next_job(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """A cancel between a handler's last checkpoint and its end cancels nothing: not
    that job, which completed, and not the next one its executor runs."""
    finished = Recorder()

    @queue.task
    async def step(i: int) -> None:
        if i == 1:
            # As if the cancel request arrived right now: no checkpoint follows.
            worker._cancel_running([current_job().id])
        else:
            await checkpoint()  # where a cancel left armed would land
        finished.record(i)

    # Both jobs come in one fetch, and the executor that ran the first takes the
    # second at once, without a checkpoint between them.
    worker = Worker(queue, concurrency=2, **FAST)
    async with running(worker):
        async with conn.transaction():
            first = await queue.enqueue(conn, step, 1)
            second = await queue.enqueue(conn, step, 2)
        assert sorted(await finished.wait_for(2)) == [1, 2]
    assert (await _job(queue, first.id)).state is JobState.COMPLETED
    assert (await _job(queue, second.id)).state is JobState.COMPLETED


async def test_rescue_retries_jobs_of_a_dead_worker(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(current_job().attempt)

    async with conn.transaction():
        job = await queue.enqueue(conn, work, 1)
    await _run_under_a_dead_worker(queue, job.id)
    worker = Worker(queue, **FAST)
    async with running(worker):
        assert await seen.wait_for(1) == [2]
    record = await _job(queue, job.id)
    assert (record.state, record.attempt) == (JobState.COMPLETED, 2)
    assert record.errors[0].type == "pgoutbox.WorkerLost"
    assert worker.statistics().rescued == 1
    assert await count_jobs(queue, "worker_id IS NOT NULL") == 0


def _maintenance_only(queue: Queue, *, vacuum_threshold: int, vacuum_due: Wakeup) -> Heartbeat:
    """A heartbeat whose maintenance steps a test calls itself, on a connection of its own."""
    return Heartbeat(
        None,  # type: ignore[arg-type]  # maintenance does not use the link
        queue,
        "w",
        register=lambda conn: checkpoint(),
        on_cancel=lambda ids: None,
        cancel_hint=Wakeup(),
        interval=1.0,
        maintenance_interval=1.0,
        completed_retention=3600.0,
        failed_retention=3600.0,
        vacuum_threshold=vacuum_threshold,
        vacuum_due=vacuum_due,
    )


async def _run_under_a_dead_worker(queue: Queue, job_id: int) -> None:
    """Make the job `running` (attempt 1) under a worker whose heartbeat expired an hour ago."""
    dead = str(uuid.uuid4())
    await _execute(
        queue,
        "INSERT INTO {schema}.workers (id, hostname, pid, queues, tasks, concurrency, "
        "heartbeat_at, heartbeat_timeout) VALUES (%s, 'gone', 1, '{{default}}', '{{}}', 1, "
        "now() - interval '1 hour', 30)",
        dead,
    )
    await _execute(
        queue,
        "UPDATE {schema}.jobs SET state = 'running', attempt = 1, worker_id = %s WHERE id = %s",
        dead,
        job_id,
    )


async def test_a_rescue_is_counted_before_the_rest_of_the_maintenance_round(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rescued jobs may run again at once, and the worker be stopped while the
    round goes on pruning: the rescue must be counted (and logged) already."""

    @queue.task
    async def work(i: int) -> None: ...

    async with conn.transaction():
        job = await queue.enqueue(conn, work, 1)
    await _run_under_a_dead_worker(queue, job.id)
    pruning = anyio.Event()

    async def prune_forever(*args: object, **kwargs: object) -> int:
        pruning.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(_store, "job_prune", prune_forever)
    heartbeat = _maintenance_only(queue, vacuum_threshold=0, vacuum_due=Wakeup())
    with watching_logs() as logs:
        async with queue.connection() as c, anyio.create_task_group() as tg:
            tg.start_soon(heartbeat._maintain, c)
            with anyio.fail_after(WAIT_TIMEOUT):
                await pruning.wait()
            tg.cancel_scope.cancel()  # the worker stops in the middle of the round
        await logs.wait_for_event("worker.rescued")
    assert heartbeat.rescued == 1


async def test_rescue_skips_a_job_whose_row_another_transaction_holds(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    # The dead worker's exactly-once transaction may still be open on the server
    # (its host vanished): the rescue must not wait for it on the worker's
    # shared connection, but take the job once the row is free.
    job = await _a_job_of_a_dead_worker(queue, conn)
    async with queue.connection() as rescuer, await pgoutbox.connect(queue.conninfo) as holder:
        await holder.execute(
            sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(
                sql.Identifier(queue.schema, "jobs")
            ),
            [job.id],
        )
        await rescuer.execute("SET statement_timeout = '5s'")
        try:
            assert await _rescue(queue, rescuer) == (1, 0)
            await holder.rollback()
            assert await _rescue(queue, rescuer) == (0, 1)
        finally:
            await rescuer.execute("RESET statement_timeout")
    assert (await _job(queue, job.id)).state is JobState.RETRYABLE


async def _a_job_of_a_dead_worker(queue: Queue, conn: pgoutbox.Connection[Any]) -> pgoutbox.Job:
    """A job of a new task, `running` (attempt 1) under a worker dead for an hour."""

    @queue.task(name="rescue.work")
    async def work() -> None: ...

    async with conn.transaction():
        job = await queue.enqueue(conn, work)
    await _run_under_a_dead_worker(queue, job.id)
    return job


async def _rescue(queue: Queue, conn: pgoutbox.Connection[Any]) -> tuple[int, int]:
    return await _store.worker_rescue_expired(
        conn, queue.statements, schema=queue.schema, channel=queue.channel
    )


async def test_a_rescue_records_when_in_utc_whatever_the_session_time_zone(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    job = await _a_job_of_a_dead_worker(queue, conn)
    async with await pgoutbox.connect(queue.conninfo, autocommit=True) as rescuer:
        await rescuer.execute("SET TimeZone = 'America/St_Johns'")  # -03:30 or -02:30
        assert await _rescue(queue, rescuer) == (1, 1)
    [error] = (await _job(queue, job.id)).errors
    assert error.at.utcoffset() == timedelta(0)


async def test_rescue_of_last_attempt_fails_the_job(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def once(i: int) -> None: ...

    async with conn.transaction():
        job = await queue.enqueue(conn, once, 1)
    await _execute(
        queue,
        "UPDATE {schema}.jobs SET state = 'running', attempt = 1, worker_id = %s WHERE id = %s",
        str(uuid.uuid4()),  # a worker with no row at all
        job.id,
    )
    with watching_logs() as logs:
        async with running(Worker(queue, **FAST)):
            await logs.wait_for_event("worker.rescued")
    assert (await _job(queue, job.id)).state is JobState.FAILED


async def test_fencing_stale_outcome_is_refused_and_logged(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    started = Recorder()
    release = anyio.Event()

    @queue.task
    async def slow(i: int) -> None:
        started.record(current_job().attempt)
        if current_job().attempt == 1:
            await release.wait()

    worker = Worker(queue, **FAST)
    with watching_logs() as logs:
        async with running(worker):
            async with conn.transaction():
                job = await queue.enqueue(conn, slow, 1)
            await started.wait_for(1)
            # A rescuer takes the job from under attempt 1 ...
            await _execute(
                queue,
                "UPDATE {schema}.jobs SET state = 'retryable', worker_id = NULL WHERE id = %s",
                job.id,
            )
            await started.wait_for(2)  # ... attempt 2 runs and completes ...
            release.set()  # ... then attempt 1 finishes late and must not win.
            await logs.wait_for_event("job.outcome_fenced")
    record = await _job(queue, job.id)
    assert (record.state, record.attempt) == (JobState.COMPLETED, 2)


async def _effects(queue: Queue) -> list[int]:
    async with queue.connection() as c:
        cur = await c.execute(
            sql.SQL("SELECT job_id FROM {}.effects ORDER BY job_id").format(
                sql.Identifier(queue.schema)
            )
        )
        return [r[0] for r in await cur.fetchall()]


async def _record_effect(tx: pgoutbox.Connection[Any], queue: Queue, job_id: int) -> None:
    await tx.execute(
        sql.SQL("INSERT INTO {}.effects VALUES (%s)").format(sql.Identifier(queue.schema)),
        [job_id],
    )


async def _run_once_with_effect(
    queue: Queue, conn: pgoutbox.Connection[Any], task: pgoutbox.Task[..., Any], seen: Recorder
) -> list[Any]:
    """Make the effects table, run one job of `task` (which records once in `seen`), check
    that its effect and its completion committed; return what it recorded."""
    await _execute(queue, "CREATE TABLE {schema}.effects (job_id bigint)")
    async with running(Worker(queue, **FAST)):
        async with conn.transaction():
            job = await queue.enqueue(conn, task, 7)
        recorded = await seen.wait_for(1)
    assert await _effects(queue) == [job.id]
    assert (await _job(queue, job.id)).state is JobState.COMPLETED
    return recorded


async def test_exactly_once_transaction_commits_effect_with_completion(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def charge(order_id: int) -> None:
        job = current_job()
        async with job.transaction() as tx:
            await _record_effect(tx, queue, job.id)
        seen.record(job.completed)

    assert await _run_once_with_effect(queue, conn, charge, seen) == [True]


async def test_a_nested_transaction_is_refused_and_the_outer_one_commits(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    # A second block completed the job on a connection of its own, and the
    # first one's writes then rolled back as lost, without a word.
    seen = Recorder()

    @queue.task
    async def charge(order_id: int) -> None:
        job = current_job()
        async with job.transaction() as tx:
            await _record_effect(tx, queue, job.id)
            try:
                async with job.transaction():
                    seen.record("nested")
            except pgoutbox.PgoutboxError as ex:
                seen.record(str(ex))

    [said] = await _run_once_with_effect(queue, conn, charge, seen)
    assert "already open" in said


async def test_an_error_after_the_transaction_committed_is_logged_and_the_job_stays_done(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def charge(order_id: int) -> None:
        async with current_job().transaction():
            pass
        raise RuntimeError("the receipt e-mail failed")

    with watching_logs() as logs:
        async with running(Worker(queue, **FAST)):
            async with conn.transaction():
                job = await queue.enqueue(conn, charge, 7)
            await logs.wait_for_event("job.failed_after_commit")
    [record] = [r for r in logs.records if getattr(r, "event", "") == "job.failed_after_commit"]
    assert record.exc_info is not None
    assert (await _job(queue, job.id)).state is JobState.COMPLETED


async def test_exactly_once_transaction_refused_after_rescue(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    await _execute(queue, "CREATE TABLE {schema}.effects (job_id bigint, attempt int)")
    inside = Recorder()
    outcomes = Recorder()
    release = anyio.Event()

    @queue.task
    async def charge(order_id: int) -> None:
        job = current_job()
        try:
            async with job.transaction() as tx:
                await tx.execute(
                    sql.SQL("INSERT INTO {}.effects VALUES (%s, %s)").format(
                        sql.Identifier(queue.schema)
                    ),
                    [job.id, job.attempt],
                )
                inside.record(job.attempt)
                if job.attempt == 1:
                    await release.wait()
        except pgoutbox.JobLostError:
            outcomes.record(("lost", job.attempt))
            raise
        outcomes.record(("committed", job.attempt))

    async with running(Worker(queue, **FAST)):
        async with conn.transaction():
            job = await queue.enqueue(conn, charge, 7)
        await inside.wait_for(1)
        await _execute(
            queue,
            "UPDATE {schema}.jobs SET state = 'retryable', worker_id = NULL WHERE id = %s",
            job.id,
        )
        await outcomes.wait_for(1)
        release.set()
        await outcomes.wait_for(2)
    assert outcomes.calls == [("committed", 2), ("lost", 1)]
    async with queue.connection() as c:
        cur = await c.execute(
            sql.SQL("SELECT attempt FROM {}.effects").format(sql.Identifier(queue.schema))
        )
        assert await cur.fetchall() == [(2,)]
    assert (await _job(queue, job.id)).state is JobState.COMPLETED


async def test_heartbeat_reregisters_a_worker_declared_dead(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def work(i: int) -> None: ...

    worker = Worker(queue, **FAST)
    with watching_logs() as logs:
        async with running(worker):
            with anyio.fail_after(WAIT_TIMEOUT):
                await worker.wait_listening()  # registered before it listens
            await _execute(queue, "DELETE FROM {schema}.workers")
            await logs.wait_for_event("worker.declared_dead")
            async with queue.connection() as c:
                cur = await c.execute(
                    sql.SQL("SELECT count(*) FROM {}.workers WHERE id = %s").format(
                        sql.Identifier(queue.schema)
                    ),
                    [worker.id],
                )
                assert await cur.fetchone() == (1,)


async def test_worker_heartbeat_timeout_must_exceed_interval(queue: Queue) -> None:
    @queue.task
    async def work(i: int) -> None: ...

    with pytest.raises(pgoutbox.ConfigurationError, match="heartbeat_timeout"):
        Worker(queue, heartbeat_interval=5, heartbeat_timeout=10)


async def test_maintenance_prunes_finished_jobs_past_retention(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def work(ok: bool) -> None:
        seen.record(ok)
        if not ok:
            raise ValueError("bad")

    worker = Worker(queue, completed_retention=0.001, failed_retention=3600, **FAST)
    with watching_logs() as logs:
        async with running(worker):
            async with conn.transaction():
                await queue.enqueue(conn, work, ok=True)
                failed = await queue.enqueue(conn, work, ok=False)
            await seen.wait_for(2)
            await logs.wait_for_event("jobs.pruned")
    assert await count_jobs(queue) == 1  # the failed job is kept for its retention
    assert (await _job(queue, failed.id)).state is JobState.FAILED
    assert worker.statistics().pruned == 1


async def _vacuum_count(queue: Queue) -> int:
    async with queue.connection() as c:
        cur = await c.execute(
            "SELECT vacuum_count FROM pg_stat_user_tables "
            "WHERE schemaname = %s AND relname = 'jobs'",
            [queue.schema],
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_maintenance_vacuums_the_jobs_table_past_its_dead_rows_threshold(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    assert await _vacuum_count(queue) == 0
    # Autovacuum would otherwise vacuum these 80 dead rows too, perhaps first.
    await _execute(queue, "ALTER TABLE {schema}.jobs SET (autovacuum_enabled = false)")
    worker = Worker(queue, completed_retention=0, vacuum_threshold=20, **FAST)
    with watching_logs() as logs:
        async with running(worker):
            async with conn.transaction():
                await queue.enqueue_many(conn, [work.bind(i) for i in range(40)])
            await seen.wait_for(40)
            # Each job left two dead row versions (its claim and its deletion).
            await logs.wait_for_event("jobs.vacuumed")
    assert worker.statistics().vacuums >= 1
    # A vacuum's own statistics are written before it returns.
    assert await _vacuum_count(queue) >= 1


async def test_vacuum_is_due_past_the_threshold_for_the_tables_owner_only(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def work(i: int) -> None: ...

    async with conn.transaction():
        await queue.enqueue_many(conn, [work.bind(i) for i in range(30)])
    st, schema = queue.statements, queue.schema
    role = f"pgoutbox_test_{uuid.uuid4().hex[:12]}"
    async with queue.connection() as c:
        async with c.transaction():
            await c.execute(sql.SQL("DELETE FROM {}.jobs").format(sql.Identifier(schema)))
            # Report the deletes' statistics at commit, not up to a second later.
            await c.execute("SELECT pg_stat_force_next_flush()")
        due, changes = await _store.jobs_vacuum_due(c, st, schema=schema, threshold=30)
        assert (due, changes) == (True, 30)
        assert not (await _store.jobs_vacuum_due(c, st, schema=schema, threshold=31))[0]
        await c.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        try:
            await c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            assert not (await _store.jobs_vacuum_due(c, st, schema=schema, threshold=1))[0]
        finally:
            await c.execute("RESET ROLE")
            await c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_vacuum_is_due_for_a_role_granted_maintain_from_postgres_17_on(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """PostgreSQL 17 lets a role that does not own the table vacuum it with the
    MAINTAIN privilege; older servers do not know the privilege, and the check
    must not ask them about it."""
    await _dead_rows(queue, 5)
    st, schema = queue.statements, queue.schema
    role = f"pgoutbox_test_{uuid.uuid4().hex[:12]}"
    async with queue.connection() as c:
        cur = await c.execute("SELECT current_setting('server_version_num')::int")
        row = await cur.fetchone()
        assert row is not None
        has_maintain = row[0] >= 170000
        await c.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        try:
            if has_maintain:
                await c.execute(
                    sql.SQL("GRANT MAINTAIN ON {}.jobs TO {}").format(
                        sql.Identifier(schema), sql.Identifier(role)
                    )
                )
            await c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            due, _ = await _store.jobs_vacuum_due(c, st, schema=schema, threshold=5)
            assert due is has_maintain
        finally:
            await c.execute("RESET ROLE")
            await c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            await c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def _dead_rows(queue: Queue, n: int) -> None:
    """Insert and delete `n` job rows, and report their statistics at once."""
    async with queue.connection() as c, c.transaction():
        await c.execute(
            sql.SQL(
                "INSERT INTO {}.jobs (queue, task, args, max_attempts) "
                "SELECT 'q', 't', '{{}}', 1 FROM generate_series(1, %s)"
            ).format(sql.Identifier(queue.schema)),
            [n],
        )
        await c.execute(sql.SQL("DELETE FROM {}.jobs").format(sql.Identifier(queue.schema)))
        await c.execute("SELECT pg_stat_force_next_flush()")


async def test_maintenance_wakes_the_vacuumer_again_only_after_more_rows_changed(
    queue: Queue,
) -> None:
    due = Wakeup()
    heartbeat = _maintenance_only(queue, vacuum_threshold=10, vacuum_due=due)
    async with queue.connection() as c:
        await _dead_rows(queue, 10)
        await heartbeat._check_vacuum(c)
        assert await due.wait(0)
        # The dead rows stay (as if a long transaction still saw them): no new wake-up.
        await heartbeat._check_vacuum(c)
        assert not await due.wait(0)
        await _dead_rows(queue, 9)
        await heartbeat._check_vacuum(c)
        assert not await due.wait(0)
        await _dead_rows(queue, 1)
        await heartbeat._check_vacuum(c)
        assert await due.wait(0)


async def test_maintenance_wakes_the_vacuumer_after_the_statistics_were_reset(
    queue: Queue,
) -> None:
    # The count of changed rows starts again from 0 (pg_stat_reset, a crash of
    # the server): the worker must not wait for it to pass its old value.
    due = Wakeup()
    heartbeat = _maintenance_only(queue, vacuum_threshold=10, vacuum_due=due)
    async with queue.connection() as c:
        await _dead_rows(queue, 50)
        await heartbeat._check_vacuum(c)
        assert await due.wait(0)
        await c.execute(
            "SELECT pg_stat_reset_single_table_counters(%s::regclass)",
            [f'"{queue.schema}".jobs'],
        )
        await _dead_rows(queue, 10)
        await heartbeat._check_vacuum(c)
        assert await due.wait(0)


async def test_a_vacuum_that_postgres_skips_is_not_counted(queue: Queue) -> None:
    due = Wakeup()
    vacuumer = Vacuumer(lambda: queue.conninfo, queue, "w", due)
    with watching_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(vacuumer.run)
            async with queue.connection() as holder, holder.transaction():
                # The lock a vacuum takes: VACUUM (SKIP_LOCKED) skips the table with a warning.
                await holder.execute(
                    sql.SQL("LOCK TABLE {}.jobs IN SHARE UPDATE EXCLUSIVE MODE").format(
                        sql.Identifier(queue.schema)
                    )
                )
                due.set()
                await logs.wait_for_event("jobs.vacuum_skipped")
            assert vacuumer.vacuums == 0
            assert await _vacuum_count(queue) == 0
            due.set()
            await logs.wait_for_event("jobs.vacuumed")
            tg.cancel_scope.cancel()
    assert vacuumer.vacuums == 1
    assert await _vacuum_count(queue) == 1


async def test_the_timeouts_of_the_role_do_not_cut_a_vacuum_short(queue: Queue) -> None:
    await _dead_rows(queue, 50_000)  # a vacuum of several milliseconds
    async with queue.connection() as c:
        version = c.info.server_version
    # What a role's or database's settings give every session: 3 ms, less than this
    # vacuum; transaction_timeout exists from PostgreSQL 17 on.
    options = "-c statement_timeout=3"
    if version >= 170000:
        options += " -c transaction_timeout=3"
    conninfo = psycopg.conninfo.make_conninfo(queue.conninfo, options=options)
    due = Wakeup()
    vacuumer = Vacuumer(lambda: conninfo, queue, "w", due)
    with watching_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(vacuumer.run)
            due.set()
            await logs.wait_for_event("jobs.vacuumed")
            tg.cancel_scope.cancel()
    assert vacuumer.vacuums == 1
    assert await _vacuum_count(queue) == 1


async def test_a_failed_vacuum_is_logged_and_the_next_round_tries_again(queue: Queue) -> None:
    due = Wakeup()
    # Nothing listens on port 1: every connection attempt fails at once.
    vacuumer = Vacuumer(lambda: "host=127.0.0.1 port=1 user=postgres", queue, "w", due)
    with watching_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(vacuumer.run)
            due.set()
            await logs.wait_for_event("jobs.vacuum_failed")
            due.set()
            await logs.wait_for_event("jobs.vacuum_failed", count=2)
            tg.cancel_scope.cancel()
    assert vacuumer.vacuums == 0


async def test_worker_vacuum_threshold_must_be_a_count(queue: Queue) -> None:
    @queue.task
    async def work(i: int) -> None: ...

    for bad in (-1, 1.5, True):
        with pytest.raises(pgoutbox.ConfigurationError, match="vacuum_threshold"):
            Worker(queue, vacuum_threshold=bad)  # type: ignore[arg-type]


async def test_zero_completed_retention_deletes_jobs_as_they_complete(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def work(i: int) -> None:
        seen.record(i)
        if i < 0:
            raise ValueError("bad")

    # A backlog bigger than the slots: later completions ride with fetches,
    # the last ones go out through the completer on its own.
    async with conn.transaction():
        jobs = await queue.enqueue_many(conn, [work.bind(i) for i in range(-2, 40)])
    async with running(Worker(queue, concurrency=4, completed_retention=0, **FAST)):
        await seen.wait_for(len(jobs))
    # The worker stopped gracefully: every outcome is written.
    assert await count_jobs(queue) == 2
    states = {j.id: (await _job(queue, j.id)).state for j in jobs[:2]}
    assert states == {jobs[0].id: JobState.FAILED, jobs[1].id: JobState.FAILED}


async def test_status_counts_jobs_and_lists_workers(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    started = Recorder()
    release = anyio.Event()

    @queue.task(queue="reports")
    async def build(i: int) -> None:
        started.record(i)
        await release.wait()

    async with conn.transaction():
        await queue.enqueue(conn, build, 1)
        await queue.enqueue(conn, build.options(delay=3600), 2)
    worker = Worker(queue, **FAST)
    async with running(worker):
        await started.wait_for(1)
        report = await queue.status()
        release.set()
    (reports,) = report.queues
    assert reports.queue == "reports"
    assert reports.counts == {JobState.RUNNING: 1, JobState.SCHEDULED: 1}
    assert reports.oldest_due_age is None
    (info,) = report.workers
    assert (info.id, info.running, info.queues) == (worker.id, 1, ("reports",))
    assert info.heartbeat_age < WAIT_TIMEOUT


async def test_signal_delays_of_mixed_number_types_in_one_batch(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    seen = Recorder()
    gate = anyio.Event()

    @queue.task
    async def later(after: float) -> None:
        seen.record(after)
        await gate.wait()  # finish together, so the outcomes share one batch
        raise Snooze(int(after) if after >= 1 else after)

    with watching_logs() as logs:
        async with running(Worker(queue, concurrency=4, **FAST)):
            async with conn.transaction():
                await queue.enqueue_many(conn, [later.bind(60), later.bind(0.5)])
            await seen.wait_for(2)
            gate.set()
            await logs.wait_for_event("job.snoozed", count=2)
    assert await count_jobs(queue, "state = 'scheduled'") == 2


async def test_status_of_a_missing_schema_says_how_to_fix(database_dsn: str) -> None:
    with pytest.raises(pgoutbox.SchemaError, match="migrate"):
        await Queue(database_dsn, schema="never_installed").status()


async def _claim(
    queue: Queue, conn: pgoutbox.Connection[Any], task: str, completed: list[Outcome]
) -> tuple[list[ClaimedJob], set[tuple[int, int]]]:
    """One fetch of the default queue, as a worker with a new id would run it."""
    claimed, written, _ = await _store.job_claim(
        conn,
        queue.statements,
        queues=["default"],
        tasks=[task],
        limit=10,
        worker_id=str(uuid.uuid4()),
        claim_id=str(uuid.uuid4()),
        completed=completed,
    )
    return claimed, written


async def test_a_fetch_waits_for_the_disk_only_when_it_completes_attempts(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """A lost claim only runs a job again; a lost completion would leave it running."""

    @queue.task
    async def work(i: int) -> None: ...

    async with conn.transaction():
        await queue.enqueue(conn, work, 1)

    async def claim(completed: list[Outcome]) -> tuple[list[ClaimedJob], set[Any], str]:
        async with conn.transaction():  # to look at the setting before the commit
            claimed, written = await _claim(queue, conn, work.name, completed)
            cur = await conn.execute("SHOW synchronous_commit")
            row = await cur.fetchone()
        assert row is not None
        return claimed, written, str(row[0])

    (job,), _, mode = await claim([])
    assert mode == "off"
    claimed, written, mode = await claim([Outcome(job.id, job.attempt, JobState.COMPLETED)])
    assert (claimed, written) == ([], {(job.id, job.attempt)})
    assert mode != "off"
    assert (await _job(queue, job.id)).state is JobState.COMPLETED


async def test_outcomes_of_a_claim_lost_to_a_crash_are_fenced_out(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """A claim forgotten by a crash gives its attempt number again: the claim id tells
    the two runs apart, so the run the crash interrupted cannot end the new one."""

    @queue.task
    async def work(i: int) -> None: ...

    async with conn.transaction():
        await queue.enqueue(conn, work, 1)

    async def claim(completed: list[Outcome] = []) -> tuple[list[ClaimedJob], set[Any]]:  # noqa: B006
        claimed, written = await _claim(queue, conn, work.name, completed)
        await conn.commit()
        return claimed, written

    (lost,), _ = await claim()
    # What recovery does to a claim whose commit never reached the disk:
    await _execute(
        queue,
        "UPDATE {schema}.jobs SET state = 'available', attempt = attempt - 1, "
        "claim_id = NULL, worker_id = NULL WHERE id = %s",
        lost.id,
    )
    (rerun,), _ = await claim()
    assert (rerun.id, rerun.attempt) == (lost.id, lost.attempt)
    assert rerun.claim_id != lost.claim_id

    def outcome(job: ClaimedJob, state: JobState) -> Outcome:
        return Outcome(job.id, job.attempt, state, claim_id=job.claim_id)

    stale_failure = outcome(lost, JobState.FAILED)
    assert await _store.job_set_outcome_many(conn, queue.statements, [stale_failure]) == set()
    stale_done = outcome(lost, JobState.COMPLETED)
    assert await _store.job_set_outcome_many(conn, queue.statements, [stale_done]) == set()
    assert not await _store.job_complete_fenced(
        conn, queue.statements, job_id=lost.id, attempt=lost.attempt, claim_id=lost.claim_id
    )
    assert await claim([stale_done]) == ([], set())
    await conn.commit()
    assert (await _job(queue, lost.id)).state is JobState.RUNNING
    assert await claim([outcome(rerun, JobState.COMPLETED)]) == ([], {(rerun.id, rerun.attempt)})
    assert (await _job(queue, lost.id)).state is JobState.COMPLETED


async def test_a_worker_that_claims_a_job_again_after_a_lost_claim_keeps_the_newest_run(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """After a claim lost to a crash, this worker may run the same attempt twice: the
    older run's outcome is dropped, and neither run's bookkeeping upsets the other's."""
    seen = Recorder()
    gates = [anyio.Event(), anyio.Event()]

    @queue.task
    async def work(i: int) -> None:
        run = len(seen.calls)
        seen.record(run)
        await gates[run].wait()
        if run == 0:
            raise RuntimeError("the run the crash interrupted fails late")

    with watching_logs() as logs:
        async with running(Worker(queue, concurrency=4, **FAST)):
            async with conn.transaction():
                job = await queue.enqueue(conn, work, 1)
            await seen.wait_for(1)
            # What recovery does to a claim whose commit never reached the disk:
            await _execute(
                queue,
                "UPDATE {schema}.jobs SET state = 'available', attempt = attempt - 1, "
                "claim_id = NULL, worker_id = NULL WHERE id = %s",
                job.id,
            )
            await seen.wait_for(2)  # the same worker claimed it again
            gates[0].set()
            await logs.wait_for_event("job.outcome_fenced")
            assert (await _job(queue, job.id)).state is JobState.RUNNING
            gates[1].set()  # the newest run completes; the worker writes it as it stops
    record = await _job(queue, job.id)
    assert (record.state, record.attempt, record.errors) == (JobState.COMPLETED, 1, ())


async def test_a_worker_that_falls_idle_writes_outcomes_without_lingering(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fetch is coming to carry them: the next fetch then completes nothing.

    Completions would otherwise wait an hour here (or for a fetch): the last
    job's is written only if the idle worker writes it itself.
    """
    monkeypatch.setattr(_completer, "LINGER", 3600.0)
    written: set[int] = set()
    changed = anyio.Event()

    def saw(ids: Any) -> None:
        nonlocal changed
        written.update(ids)
        changed.set()
        changed = anyio.Event()

    write, claim = _store.job_set_outcome_many, _store.job_claim

    async def spy_write(*args: Any, **kwargs: Any) -> set[tuple[int, int]]:
        result = await write(*args, **kwargs)
        saw(job_id for job_id, _attempt in result)
        return result

    async def spy_claim(*args: Any, **kwargs: Any) -> Any:
        result = await claim(*args, **kwargs)
        saw(job_id for job_id, _attempt in result[1])
        return result

    monkeypatch.setattr(_store, "job_set_outcome_many", spy_write)
    monkeypatch.setattr(_store, "job_claim", spy_claim)
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    async with running(Worker(queue, poll_interval=3600.0)):
        for i in range(3):
            async with conn.transaction():
                job = await queue.enqueue(conn, work, i)
            await seen.wait_for(i + 1)
        with anyio.fail_after(WAIT_TIMEOUT):
            while job.id not in written:
                await changed.wait()
        assert (await _job(queue, job.id)).state is JobState.COMPLETED


async def test_claimed_jobs_run_even_if_the_connection_dies_right_after_the_claim(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos test: a claim committed, then the next statement failed."""
    real = _producer._store.job_claim
    failures = [psycopg.OperationalError("server closed the connection (simulated)")]
    failed = anyio.Event()
    claimed: list[int] = []

    async def claim_then_die(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        if claimed and failures:  # the statement after the claim that got the job
            failed.set()
            raise failures.pop()
        result = await real(*args, **kwargs)
        claimed.extend(job.id for job in result[0])
        return result

    monkeypatch.setattr(_producer._store, "job_claim", claim_then_die)
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    async with running(Worker(queue, **FAST)):
        async with conn.transaction():
            job = await queue.enqueue(conn, work, 1)
        await seen.wait_for(1)
        with anyio.fail_after(WAIT_TIMEOUT):
            await failed.wait()
    assert claimed == [job.id]
    assert (await _job(queue, job.id)).state is JobState.COMPLETED


async def test_a_worker_whose_fetch_outlives_its_connection_runs_the_job_once_it_commits(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole story end to end: the worker closes its connection while a fetch
    # still runs on the server (here the heartbeat, whose timeout also counts its
    # wait for the connection, behind a fetch blocked on a row lock); the fetch
    # commits its claim later, and the job runs once the claim is given back.
    # (The test below pins down the order of the two.)
    monkeypatch.setattr(_heartbeat, "STATEMENT_TIMEOUT", 0.5)
    monkeypatch.setattr(_completer, "LINGER", WAIT_TIMEOUT)  # A's completion waits for the fetch
    a_started, a_done, c_done = anyio.Event(), anyio.Event(), anyio.Event()
    seen = Recorder()

    @queue.task
    async def a() -> None:
        a_started.set()
        await a_done.wait()

    @queue.task
    async def c() -> None:
        await c_done.wait()

    @queue.task
    async def b() -> None:
        seen.record("b")

    async with conn.transaction():
        job_a = await queue.enqueue(conn, a)
        await queue.enqueue(conn, c)
    with watching_logs() as logs:
        # No polling: once the claim can be given back, the worker must look
        # again of its own accord.
        options: dict[str, Any] = {**FAST, "poll_interval": 3600.0}
        async with (
            running(Worker(queue, concurrency=2, **options)),
            await pgoutbox.connect(queue.conninfo) as locker,
        ):
            with anyio.fail_after(WAIT_TIMEOUT):
                await a_started.wait()
            async with conn.transaction():
                await queue.enqueue(conn, b)
            # A's completion leaves with the fetch that claims b, and waits for this lock.
            await locker.execute(
                sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(
                    sql.Identifier(queue.schema, "jobs")
                ),
                [job_a.id],
            )
            a_done.set()
            await logs.wait_for_event("worker.lost_fetch_running")
            await locker.rollback()
            assert await seen.wait_for(1) == ["b"]
            c_done.set()
    assert (await _job(queue, job_a.id)).state is JobState.COMPLETED


async def test_a_lost_fetch_is_given_back_only_once_its_session_has_ended(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reply can be lost on the worker's side alone while the server still
    # runs the fetch (blocked on a lock, say). Given back then, the claim would
    # find nothing, and the fetch could commit it afterwards: a job running
    # under a live worker that no executor runs.
    @queue.task
    async def work(i: int) -> None: ...

    async with conn.transaction():
        job = await queue.enqueue(conn, work, 1)
    monkeypatch.setattr(_producer, "PENDING_CHECK_INTERVAL", 0.0)
    worker = Worker(queue, **FAST)
    producer, st = worker._producer, queue.statements
    key, claim = 7_000_000_000_000_000_001, str(uuid.uuid4())
    fetch_conn = await worker._link.get()
    try:
        async with await pgoutbox.connect(queue.conninfo) as old:  # where the fetch ran
            assert await _store.fetch_session_start(old, st, key=key, idle_timeout=60)
            await old.execute(  # the fetch's claim, not committed yet
                sql.SQL(
                    "UPDATE {} SET state = 'running', attempt = attempt + 1, worker_id = %s, "
                    "claim_id = %s WHERE id = %s"
                ).format(sql.Identifier(queue.schema, "jobs")),
                [worker.id, claim, job.id],
            )
            producer._unconfirmed = [_producer._Unconfirmed(claim, key)]
            assert await producer._release_unconfirmed(fetch_conn)
            assert [lost.claim_id for lost in producer._unconfirmed] == [claim]
            await old.commit()  # the fetch commits its claim after all
            # The session ends (as its end, or a pooler's reset, would release it).
            await old.execute("SELECT pg_advisory_unlock_all()")
            assert await producer._release_unconfirmed(fetch_conn)
        assert producer._unconfirmed == []
        record = await _job(queue, job.id)
        assert (record.state, record.attempt) == (JobState.AVAILABLE, 0)
    finally:
        await worker._link.close()


async def test_each_fetch_connection_takes_a_session_lock_of_its_own(queue: Queue) -> None:
    # A fetch on a connection that does not hold the key its claim is filed
    # under could be given back while it still runs.
    @queue.task
    async def work(i: int) -> None: ...

    worker = Worker(queue, **FAST)
    producer = worker._producer
    try:
        first = await worker._link.get()
        first_key = await producer._session_lock_of(first)
        await worker._link.failed(first, OSError("dropped by the test"))
        second = await worker._link.get()
        second_key = await producer._session_lock_of(second)
        assert first_key is not None
        assert second_key not in (None, first_key)
        async with await pgoutbox.connect(queue.conninfo, autocommit=True) as other:
            ended = await _store.fetch_sessions_ended(
                other,
                queue.statements,
                keys=[second_key],  # type: ignore[list-item]
            )
            assert ended == set()  # the second session holds its lock
        if second.info.server_version >= 140000:
            cur = await second.execute(
                "SELECT current_setting('idle_session_timeout'),"
                " current_setting('client_connection_check_interval')"
            )
            assert await cur.fetchone() == ("1min", "1s")
    finally:
        await worker._link.close()


async def test_a_heartbeat_interval_of_days_leaves_the_session_without_an_idle_limit(
    queue: Queue,
) -> None:
    # Ten intervals of three days are past what idle_session_timeout can hold.
    async with await pgoutbox.connect(queue.conninfo, autocommit=True) as conn:
        assert await _store.fetch_session_start(
            conn, queue.statements, key=7_000_000_000_000_000_003, idle_timeout=30 * 86400
        )
        if conn.info.server_version >= 140000:
            cur = await conn.execute("SHOW idle_session_timeout")
            assert await cur.fetchone() == ("0",)


async def test_claim_whose_reply_was_lost_is_given_back(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _producer._store.job_claim
    lost: list[int] = []

    async def claim_then_lose_reply(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        claimed, written, next_due = await real(*args, **kwargs)
        if claimed and not lost:
            lost.extend(job.id for job in claimed)
            raise psycopg.OperationalError("reply lost (simulated)")
        return claimed, written, next_due

    monkeypatch.setattr(_producer._store, "job_claim", claim_then_lose_reply)
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(current_job().attempt)

    with watching_logs() as logs:
        async with running(Worker(queue, **FAST)):
            async with conn.transaction():
                job = await queue.enqueue(conn, work, 1)
            assert await seen.wait_for(1) == [1]  # the lost claim did not spend an attempt
            await logs.wait_for_event("worker.claim_released")
    assert lost == [job.id]
    assert (await _job(queue, job.id)).state is JobState.COMPLETED


async def test_an_outcome_the_completer_cannot_take_in_time_is_still_written(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # After waiting out the backpressure bound, the outcome was dropped: the
    # job stayed running under a live worker, and went back to the queue when
    # the worker stopped, to run again.
    monkeypatch.setattr(_worker_module, "CLEANUP_TIMEOUT", 0.05)
    seen = Recorder()

    @queue.task
    async def work(i: int) -> None:
        seen.record(i)

    worker = Worker(queue, **FAST)
    monkeypatch.setattr(worker._completer, "put_nowait", lambda _outcome: False)
    monkeypatch.setattr(worker._completer, "put", lambda _outcome: anyio.sleep_forever())
    async with running(worker):
        async with conn.transaction():
            job = await queue.enqueue(conn, work, 1)
        await seen.wait_for(1)
    record = await _job(queue, job.id)
    assert (record.state, record.attempt) == (JobState.COMPLETED, 1)


async def test_rescue_gives_workers_a_full_timeout_after_the_server_started(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    # While the server was down nobody could beat: right after it (re)started
    # every heartbeat looks old, and rescue must wait a whole timeout before it
    # declares a worker dead. A worker's timeout longer than the server's age
    # puts the server in that wait, whenever it started.
    st = queue.statements
    cur = await conn.execute(
        "SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8"
    )
    row = await cur.fetchone()
    assert row is not None
    waiting_for, gone = str(uuid.uuid4()), str(uuid.uuid4())
    for worker, timeout in ((waiting_for, row[0] + 3600), (gone, 0.01)):
        await _store.worker_register(
            conn,
            st,
            worker_id=worker,
            hostname="test",
            pid=1,
            queues=["default"],
            tasks=["t"],
            concurrency=1,
            heartbeat_timeout=timeout,
        )
    workers = sql.Identifier(queue.schema, "workers")
    await conn.execute(
        sql.SQL(
            "UPDATE {} SET heartbeat_at = now() - (heartbeat_timeout + 3600) * interval '1 second'"
        ).format(workers)
    )
    assert await _store.worker_rescue_expired(
        conn, st, schema=queue.schema, channel=queue.channel
    ) == (1, 0)
    cur = await conn.execute(sql.SQL("SELECT id::text FROM {}").format(workers))
    assert await cur.fetchall() == [(waiting_for,)]


async def test_a_heartbeat_tells_the_link_the_database_works_again(queue: Queue) -> None:
    # With every slot busy on long jobs, no fetch or write comes: after an
    # outage only the heartbeat can end the backoff, or the next blip would
    # keep the worker away for the longest wait (30 s, past its heartbeat).
    link = _link.Link(lambda: queue.conninfo)
    for _ in range(8):
        link._note_failure(RuntimeError("an outage"))
    link.hurry()
    beats = Recorder()

    async def register(conn: Any) -> None:  # the row is never written: every beat calls this
        beats.record(conn)

    heartbeat = Heartbeat(
        link,
        queue,
        str(uuid.uuid4()),
        register=register,
        on_cancel=lambda ids: None,
        cancel_hint=Wakeup(),
        interval=0.01,
        maintenance_interval=3600.0,
        completed_retention=3600.0,
        failed_retention=3600.0,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat.run)
            await beats.wait_for(2)  # the first beat has ended
            tg.cancel_scope.cancel()
        assert link._backoff.failures == 0
    finally:
        await link.close()


async def test_a_worker_on_a_read_only_server_backs_off_and_stops_when_asked(
    queue: Queue,
) -> None:
    # As a standby after a failover: the statements fail with
    # ReadOnlySqlTransaction. The worker must reconnect (the next connection may
    # reach the new primary), not crash; and a stop must not wait for it to get in.
    read_only = Queue(
        queue.conninfo + " options='-c default_transaction_read_only=on'", schema=queue.schema
    )

    @read_only.task
    async def work() -> None: ...

    try:
        worker = Worker(read_only, poll_interval=0.05)
        with watching_logs() as logs:
            async with running(worker):
                await logs.wait_for_event("worker.connection_failed")
        assert await count_jobs(queue) == 0
        async with queue.connection() as c:
            cur = await c.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(queue.schema, "workers"))
            )
            assert await cur.fetchone() == (0,)
    finally:
        await read_only.aclose()


async def test_a_stop_that_cannot_unregister_in_time_says_so(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker_module, "CLEANUP_TIMEOUT", 0.5)

    @queue.task
    async def work() -> None: ...

    worker = Worker(queue, poll_interval=0.05)
    with watching_logs() as logs:
        async with running(worker):
            await logs.wait_for_event("worker.started")
            # The database goes away: every new connection is refused.
            monkeypatch.setattr(queue, "_conninfo", "host=127.0.0.1 port=1 connect_timeout=1")
            await conn.execute("SELECT pg_terminate_backend(%s)", [worker._link.pids[-1]])
            await conn.commit()
            await logs.wait_for_event("worker.connection_failed")
        await logs.wait_for_event("worker.unregister_failed")
    [record] = [r for r in logs.records if getattr(r, "event", None) == "worker.unregister_failed"]
    assert record.error == "TimeoutError"  # type: ignore[attr-defined]


async def test_a_stop_while_the_registration_is_on_its_way_leaves_no_worker_row(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The row is committed but the reply not read yet when the stop comes: the
    # worker must still remove the row, or it stays until another worker's rescue.
    registered, reply = anyio.Event(), anyio.Event()
    real = _store.worker_register

    async def register_with_a_slow_reply(*args: Any, **kwargs: Any) -> None:
        await real(*args, **kwargs)
        registered.set()
        await reply.wait()

    monkeypatch.setattr(_store, "worker_register", register_with_a_slow_reply)

    @queue.task
    async def work() -> None: ...

    worker = Worker(queue, poll_interval=0.05)
    async with running(worker):
        with anyio.fail_after(WAIT_TIMEOUT):
            await registered.wait()
        worker.stop()
        reply.set()
    async with queue.connection() as c:
        cur = await c.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(queue.schema, "workers"))
        )
        assert await cur.fetchone() == (0,)
