"""Unique keys: one unfinished job per key, whoever enqueues it and however."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

import pgoutbox
from pgoutbox import JobState, Queue, TaskRef

from ._running import count_jobs, until_waiting_for_a_lock

pytestmark = pytest.mark.anyio


async def _notifications(listener: pgoutbox.Connection[Any], wait: float) -> list[str]:
    return [n.payload async for n in listener.notifies(timeout=wait)]


async def test_a_second_job_with_the_key_of_an_unfinished_one_is_not_written(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    listener = await pgoutbox.connect(database_dsn, autocommit=True)
    try:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(queue.channel)))
        async with conn.transaction():
            first = await queue.enqueue(conn, charge.options(key="charge:7"), 7)
        async with conn.transaction():
            again = await queue.enqueue(conn, charge.options(key="charge:7"), 8)
        # Only the job written notifies.
        assert await _notifications(listener, 0.3) == ["default"]
    finally:
        await listener.close()
    assert not first.duplicate
    assert again.duplicate
    assert (again.id, again.run_at) == (first.id, first.run_at)
    assert await count_jobs(queue) == 1
    record = await queue.get_job(first.id)
    assert record is not None
    assert record.key == "charge:7"
    assert record.args == '{"order_id": 7}'


@pytest.mark.parametrize("how", ["completed", "cancelled", "failed"])
async def test_a_finished_job_frees_its_key(
    queue: Queue, conn: pgoutbox.Connection[Any], how: str
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    keyed = charge.options(key="charge:7", delay=3600)
    async with conn.transaction():
        first = await queue.enqueue(conn, keyed, 7)
    if how == "cancelled":
        await queue.cancel(conn, first.id)
    else:
        await conn.execute(
            sql.SQL("UPDATE {} SET state = %s::text::{}, finished_at = now() WHERE id = %s").format(
                sql.Identifier(queue.schema, "jobs"), sql.Identifier(queue.schema, "job_state")
            ),
            [how, first.id],
        )
    await conn.commit()
    second = await queue.enqueue(conn, keyed, 7)
    await conn.commit()
    assert not second.duplicate
    assert second.id != first.id


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_a_key_held_by_an_uncommitted_job_waits_for_that_transaction(
    queue: Queue, database_dsn: str, outcome: str
) -> None:
    """As any unique index: the second producer waits, then sees the first job if
    it committed (in a second statement: it was not in the first one's snapshot),
    or writes its own if it rolled back."""

    @queue.task
    async def charge(order_id: int) -> None: ...

    keyed = charge.options(key="charge:7")
    async with (
        await pgoutbox.connect(database_dsn) as first_conn,
        await pgoutbox.connect(database_dsn) as second_conn,
    ):
        first = await queue.enqueue(first_conn, keyed, 1)  # its transaction stays open
        second: list[pgoutbox.Job] = []

        async def enqueue_second() -> None:
            second.append(await queue.enqueue(second_conn, keyed, 2))
            await second_conn.commit()

        async with anyio.create_task_group() as tg:
            tg.start_soon(enqueue_second)
            await until_waiting_for_a_lock(first_conn, second_conn.info.backend_pid)
            if outcome == "commit":
                await first_conn.commit()
            else:
                await first_conn.rollback()
    [job] = second
    if outcome == "commit":
        assert (job.id, job.duplicate) == (first.id, True)
    else:
        assert job.id != first.id
        assert not job.duplicate
    assert await count_jobs(queue) == 1


async def test_enqueue_many_with_keys_keeps_the_order_and_marks_duplicates(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    async with conn.transaction():
        held = await queue.enqueue(conn, charge.options(key="held"), 0)
    specs = [
        charge.bind(1),
        charge.options(key="a").bind(2),
        charge.options(key="held").bind(3),
        charge.bind(4),
        charge.options(key="a").bind(5),  # the same key twice in one batch
        TaskRef(name=charge.name, key="b").bind(order_id=6),
    ]
    async with conn.transaction():
        jobs = await queue.enqueue_many(conn, specs)
    assert [j.duplicate for j in jobs] == [False, False, True, False, True, False]
    assert jobs[2].id == held.id
    assert jobs[4].id == jobs[1].id
    written = [j.id for j in jobs if not j.duplicate]
    assert len(set(written)) == 4
    args = {}
    for job in jobs:
        record = await queue.get_job(job.id)
        assert record is not None
        args[job.id] = record.args
    assert [args[j.id] for j in jobs] == [
        '{"order_id": 1}',
        '{"order_id": 2}',
        '{"order_id": 0}',
        '{"order_id": 4}',
        '{"order_id": 2}',
        '{"order_id": 6}',
    ]
    assert await count_jobs(queue) == 5


async def test_enqueue_sync_honours_keys(queue: Queue, database_dsn: str) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    with psycopg.Connection.connect(database_dsn) as sync_conn:
        first = queue.enqueue_sync(sync_conn, charge.options(key="k"), 1)
        again = queue.enqueue_sync(sync_conn, charge.options(key="k"), 2)
        many = queue.enqueue_many_sync(sync_conn, [charge.options(key="k").bind(3)])
        sync_conn.commit()
    assert not first.duplicate
    assert again.duplicate
    assert again.id == first.id
    assert [(j.id, j.duplicate) for j in many] == [(first.id, True)]
    assert await count_jobs(queue, "state = 'available'") == 1
    assert (await queue.get_job(first.id)).state is JobState.AVAILABLE  # type: ignore[union-attr]


async def test_a_duplicate_is_the_job_that_holds_the_key_with_its_own_task_and_queue(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    @queue.task(queue="mail")
    async def email(order_id: int) -> None: ...

    async with conn.transaction():
        held = await queue.enqueue(conn, charge.options(key="order:7"), 7)
        again = await queue.enqueue(conn, email.options(key="order:7"), 7)
    assert again.duplicate
    assert (again.id, again.task, again.queue) == (held.id, charge.name, "default")


async def test_the_holder_returned_is_the_one_holding_the_key_now(
    queue: Queue, database_dsn: str
) -> None:
    """The holder in the enqueue's snapshot finished, and another took the key,
    while the enqueue waited: the one holding it now comes back."""

    @queue.task
    async def charge(order_id: int) -> None: ...

    keyed = charge.options(key="k")
    jobs = sql.Identifier(queue.schema, "jobs")
    async with (
        await pgoutbox.connect(database_dsn, autocommit=True) as admin,
        await pgoutbox.connect(database_dsn) as taker,
        await pgoutbox.connect(database_dsn) as producer,
    ):
        old = await queue.enqueue(admin, keyed, 1)
        # The taker finishes the old holder and enqueues a new one, not committed yet.
        await taker.execute(
            sql.SQL("UPDATE {} SET state = 'completed', finished_at = now() WHERE id = %s").format(
                jobs
            ),
            [old.id],
        )
        new = await queue.enqueue(taker, keyed, 2)
        found: list[pgoutbox.Job] = []

        async def enqueue() -> None:
            found.append(await queue.enqueue(producer, keyed, 3))
            await producer.commit()

        async with anyio.create_task_group() as tg:
            tg.start_soon(enqueue)  # its snapshot has the old holder, unfinished
            await until_waiting_for_a_lock(taker, producer.info.backend_pid)
            await taker.commit()
    assert [(j.id, j.duplicate) for j in found] == [(new.id, True)]


async def test_enqueue_many_with_keys_on_an_autocommit_connection_is_all_or_nothing(
    queue: Queue, database_dsn: str
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    async with (
        await pgoutbox.connect(database_dsn) as holder,
        await pgoutbox.connect(database_dsn, autocommit=True) as producer,
    ):
        await queue.enqueue(holder, charge.options(key="k"), 0)  # not committed
        await producer.execute("SET lock_timeout = '100ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await queue.enqueue_many(
                producer, [charge.bind(1), charge.bind(2), charge.options(key="k").bind(3)]
            )
        await holder.rollback()
    assert await count_jobs(queue) == 0


async def test_keys_and_get_job_on_a_schema_before_version_11_say_so(
    queue: Queue, database_dsn: str
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        job = await queue.enqueue(conn, charge, 1)
        # What migration 11 added, taken away again.
        await conn.execute(
            sql.SQL("ALTER TABLE {} DROP COLUMN unique_key").format(
                sql.Identifier(queue.schema, "jobs")
            )
        )
        assert not (await queue.enqueue(conn, charge, 2)).duplicate  # no key: fine
        with pytest.raises(pgoutbox.errors.SchemaError, match="version 11"):
            await queue.enqueue(conn, charge.options(key="k"), 3)
    with pytest.raises(pgoutbox.errors.SchemaError, match="version 11"):
        await queue.get_job(job.id)


async def test_batches_that_share_keys_in_different_orders_do_not_deadlock(
    queue: Queue, database_dsn: str
) -> None:
    # On autocommit connections each batch holds the keys it took until it
    # commits: taken in spec order, [a, b, c] against [c, b, a] deadlocked.
    @queue.task
    async def charge(order_id: int) -> None: ...

    async with (
        await pgoutbox.connect(database_dsn, autocommit=True) as one,
        await pgoutbox.connect(database_dsn, autocommit=True) as other,
    ):
        for round_ in range(3):
            keys = [f"{round_}:{k}" for k in "abc"]

            async def batch(conn: pgoutbox.Connection[Any], keys: list[str]) -> None:
                await queue.enqueue_many(conn, [charge.options(key=k).bind(0) for k in keys])

            async with anyio.create_task_group() as tg:
                tg.start_soon(batch, one, keys)
                tg.start_soon(batch, other, keys[::-1])
    assert await count_jobs(queue) == 9


async def test_an_unrelated_undefined_column_is_not_taken_for_an_old_schema(
    queue: Queue, database_dsn: str
) -> None:
    @queue.task
    async def charge(order_id: int) -> None: ...

    jobs = sql.Identifier(queue.schema, "jobs")
    check = sql.Identifier(queue.schema, "check_tenant")
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        await conn.execute(
            sql.SQL(
                "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM NEW.tenant_id; RETURN NEW; END $$"
            ).format(check)
        )
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER check_tenant BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()"
            ).format(jobs, check)
        )
        for task in (charge, charge.options(key="k")):
            with pytest.raises(psycopg.errors.UndefinedColumn, match="tenant_id"):
                await queue.enqueue(conn, task, 1)
