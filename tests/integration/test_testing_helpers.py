"""pgoutbox.testing against a real database: isolated schemas and drain."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest
from psycopg import sql

import pgoutbox
from pgoutbox import Queue
from pgoutbox.testing import drain, isolated

pytestmark = pytest.mark.anyio


async def test_isolated_copy_runs_tasks_and_is_dropped(database_dsn: str) -> None:
    app_queue = Queue(database_dsn, schema="app_never_migrated", notify=False)
    done: list[int] = []

    @app_queue.task
    async def work(i: int) -> None:
        done.append(i)

    async with isolated(app_queue) as queue, await pgoutbox.connect(database_dsn) as conn:
        assert queue.schema != app_queue.schema
        assert queue.tasks == app_queue.tasks
        assert queue.notify is False
        async with conn.transaction():
            await queue.enqueue_many(conn, [work.bind(i) for i in range(3)])
        await drain(queue)
        schema = queue.schema
    assert sorted(done) == [0, 1, 2]
    async with await pgoutbox.connect(database_dsn, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", [schema]
        )
        assert await cur.fetchone() == (0,)


async def test_drain_runs_everything_due(queue: Queue, conn: pgoutbox.Connection[Any]) -> None:
    done: list[int] = []

    @queue.task
    async def work(i: int) -> None:
        done.append(i)

    async with conn.transaction():
        await queue.enqueue_many(conn, [work.bind(i) for i in range(20)])
        await queue.enqueue(conn, work.options(delay=3600), 99)
    await drain(queue)
    assert sorted(done) == list(range(20))
    async with queue.connection() as c:
        cur = await c.execute(
            sql.SQL("SELECT count(*) FROM {}.jobs WHERE state = 'completed'").format(
                sql.Identifier(queue.schema)
            )
        )
        assert await cur.fetchone() == (20,)


async def test_drain_runs_jobs_sent_to_another_queue(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    done: list[str] = []

    @queue.task
    async def work(where: str) -> None:
        done.append(where)

    async with conn.transaction():
        await queue.enqueue(conn, work, "default")
        await queue.enqueue(conn, work.options(queue="emails"), "emails")
    await drain(queue, timeout=10)
    assert sorted(done) == ["default", "emails"]


async def test_drain_consumes_a_queue_whose_job_is_not_due_yet_when_it_starts(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    done: list[str] = []
    started, release = anyio.Event(), anyio.Event()

    @queue.task
    async def work(where: str) -> None:
        if where == "default":
            started.set()
            await release.wait()
        done.append(where)

    async with conn.transaction():
        await queue.enqueue(conn, work, "default")
        later = await queue.enqueue(conn, work.options(queue="later", delay=3600), "later")
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(drain, queue, timeout=10))
        with anyio.fail_after(10):
            await started.wait()
        # The delayed job falls due while drain runs.
        await conn.execute(
            sql.SQL("UPDATE {} SET run_at = now() WHERE id = %s").format(
                sql.Identifier(queue.schema, "jobs")
            ),
            [later.id],
        )
        await conn.commit()
        release.set()
    assert sorted(done) == ["default", "later"]
