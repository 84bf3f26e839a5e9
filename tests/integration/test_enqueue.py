"""Transactional enqueue against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import msgspec
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

import pgoutbox
from pgoutbox import ConfigurationError, PayloadError, Queue, TaskRef

from ._running import count_jobs

pytestmark = pytest.mark.anyio


async def _listen(database_dsn: str, channel: str) -> pgoutbox.Connection[Any]:
    listener = await pgoutbox.connect(database_dsn, autocommit=True)
    await listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
    return listener


async def _notifications(
    listener: pgoutbox.Connection[Any], wait: float, stop_after: int | None = None
) -> list[str]:
    """Payloads received within `wait` seconds (the listener's own timeout, not a sleep)."""
    return [n.payload async for n in listener.notifies(timeout=wait, stop_after=stop_after)]


async def test_enqueue_commit_writes_row_and_notify(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    @queue.task(queue="mail")
    async def send(to: str) -> None: ...

    listener = await _listen(database_dsn, queue.channel)
    try:
        async with conn.transaction():
            job = await queue.enqueue(conn, send, "a@example.com")
        assert job.queue == "mail"
        assert await _notifications(listener, 5.0, stop_after=1) == ["mail"]
        assert await _notifications(listener, 0.2) == []
    finally:
        await listener.close()
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is pgoutbox.JobState.AVAILABLE
    assert record.args == '{"to": "a@example.com"}'
    assert record.task == send.name


async def _enqueue_then_abort(
    queue: Queue, conn: pgoutbox.Connection[Any], task: pgoutbox.Task[[str], None]
) -> None:
    async with conn.transaction():
        await queue.enqueue(conn, task, "a@example.com")
        raise RuntimeError("abort")


async def test_enqueue_rollback_leaves_no_row_and_no_notify(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    @queue.task
    async def send(to: str) -> None: ...

    listener = await _listen(database_dsn, queue.channel)
    try:
        with pytest.raises(RuntimeError, match="abort"):
            await _enqueue_then_abort(queue, conn, send)
        assert await _notifications(listener, 0.3) == []
    finally:
        await listener.close()
    assert await count_jobs(queue) == 0


async def test_enqueue_notifies_once_per_queue_per_transaction(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    @queue.task
    async def send(to: str) -> None: ...

    listener = await _listen(database_dsn, queue.channel)
    try:
        async with conn.transaction():
            for i in range(5):
                await queue.enqueue(conn, send, f"{i}@example.com")
        assert await _notifications(listener, 0.3) == ["default"]
    finally:
        await listener.close()
    assert await count_jobs(queue) == 5


async def test_enqueue_of_a_job_due_in_more_than_a_minute_does_not_notify(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    """Workers poll more often than that: one finds the job before it is due."""

    @queue.task
    async def send(to: str) -> None: ...

    listener = await _listen(database_dsn, queue.channel)
    try:
        async with conn.transaction():
            job = await queue.enqueue(conn, send.options(delay=61), "a@example.com")
            later = datetime.now(UTC) + timedelta(seconds=62)
            await queue.enqueue(conn, send.options(run_at=later), "b@example.com")
        assert await _notifications(listener, 0.3) == []
    finally:
        await listener.close()
    record = await queue.get_job(job.id)
    assert record is not None
    assert record.state is pgoutbox.JobState.SCHEDULED
    assert record.run_at > record.created_at + timedelta(seconds=60)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_enqueue_of_a_job_due_within_a_minute_notifies(
    queue: Queue,
    conn: pgoutbox.Connection[Any],
    database_dsn: str,
    sync: bool,
) -> None:
    """An idle worker may not poll before it is due: the NOTIFY wakes it, and the
    fetch tells it when the job is due."""

    @queue.task(queue="mail")
    async def send(to: str) -> None: ...

    soon = datetime.now(UTC) + timedelta(seconds=59)
    # With both, run_at decides when the job is due.
    tasks = [
        send.options(delay=59),
        send.options(run_at=soon),
        send.options(delay=300, run_at=soon),
    ]
    listener = await _listen(database_dsn, queue.channel)
    try:
        for task in tasks:
            if sync:
                with psycopg.Connection.connect(database_dsn, autocommit=True) as sync_conn:
                    queue.enqueue_sync(sync_conn, task, "a@example.com")
            else:
                async with conn.transaction():
                    await queue.enqueue(conn, task, "a@example.com")
        assert await _notifications(listener, 5.0, stop_after=3) == ["mail"] * 3
    finally:
        await listener.close()
    assert await count_jobs(queue, "state = 'scheduled' AND run_at > now() + interval '50 s'") == 3


async def test_enqueue_on_autocommit_connection_is_one_atomic_statement(
    queue: Queue, database_dsn: str
) -> None:
    @queue.task
    async def send(to: str) -> None: ...

    async with await pgoutbox.connect(database_dsn, autocommit=True) as auto:
        job = await queue.enqueue(auto, send, "a@example.com")
    assert (await queue.get_job(job.id)) is not None


async def test_enqueue_bad_payload_raises_typed_error_and_writes_nothing(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def charge(order_id: int, amount: float = 0.0) -> None: ...

    bad_calls: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        (("seven",), {}, "order_id"),
        ((), {}, "order_id"),
        ((1,), {"colour": "red"}, "colour"),
        ((1,), {"amount": "lots"}, "amount"),
    ]
    async with conn.transaction():
        for args, kwargs, field in bad_calls:
            with pytest.raises(PayloadError, match=field) as caught:
                await queue.enqueue(conn, charge, *args, **kwargs)  # type: ignore[arg-type]
            assert caught.value.task == charge.name
    assert await count_jobs(queue) == 0


async def test_enqueue_by_name_needs_no_handler(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    producer = Queue(queue.conninfo, schema=queue.schema)  # knows no tasks at all
    async with conn.transaction():
        job = await producer.enqueue(conn, "billing.charge", order_id=7)
        ref = TaskRef(name="billing.refund", queue="billing", priority=5)
        other = await producer.enqueue(conn, ref, order_id=8)
    assert (job.task, job.queue) == ("billing.charge", "default")
    record = await queue.get_job(other.id)
    assert record is not None
    assert (record.task, record.queue, record.priority) == ("billing.refund", "billing", 5)
    assert record.args == '{"order_id": 8}'


async def test_enqueue_by_name_rejects_unencodable_and_positional(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    with pytest.raises(PayloadError, match="keyword arguments only"):
        await queue.enqueue(conn, "billing.charge", 7)  # type: ignore[call-overload]
    with pytest.raises(PayloadError, match="JSON"):
        await queue.enqueue(conn, "billing.charge", when=object())
    await conn.rollback()
    assert await count_jobs(queue) == 0


async def test_enqueue_concurrent_producers_all_land(queue: Queue, database_dsn: str) -> None:
    @queue.task
    async def send(i: int) -> None: ...

    async def produce(start: int) -> None:
        async with await pgoutbox.connect(database_dsn) as c:
            for i in range(start, start + 20):
                async with c.transaction():
                    await queue.enqueue(c, send, i)

    async with anyio.create_task_group() as tg:
        for start in range(0, 100, 20):
            tg.start_soon(produce, start)
    assert await count_jobs(queue) == 100


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_enqueue_on_stock_psycopg_connection_and_pool(
    queue: Queue, database_dsn: str
) -> None:
    """On asyncio, users keep their own psycopg connections and psycopg_pool pools."""

    @queue.task
    async def send(to: str) -> None: ...

    async with (
        await psycopg.AsyncConnection.connect(database_dsn) as stock,
        stock.transaction(),
    ):
        first = await queue.enqueue(stock, send, "a@example.com")
    pool = AsyncConnectionPool(database_dsn, min_size=1, max_size=2, open=False)
    await pool.open()
    try:
        pooled = Queue(pool=pool, schema=queue.schema)
        async with pool.connection() as conn, conn.transaction():
            second = await pooled.enqueue(conn, send, "b@example.com")
        assert (await pooled.get_job(second.id)) is not None
    finally:
        await pool.close()
    assert first.id < second.id
    assert await count_jobs(queue) == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_enqueue_and_cancel_on_a_connection_with_another_row_factory(
    queue: Queue, database_dsn: str
) -> None:
    """Apps often give their connections dict_row: our statements read tuples regardless."""

    @queue.task
    async def send(to: str) -> None: ...

    async with await psycopg.AsyncConnection.connect(database_dsn, row_factory=dict_row) as stock:
        async with stock.transaction():
            one = await queue.enqueue(stock, send, "a@example.com")
            many = await queue.enqueue_many(stock, [send.bind("b"), send.bind("c")])
        assert await queue.check_schema(stock) >= 1
        result = await queue.cancel(stock, one.id)
        await stock.commit()
    assert result.cancelled == (one.id,)
    assert [j.id for j in many] == [one.id + 1, one.id + 2]
    assert await count_jobs(queue) == 3


async def test_enqueue_many_one_statement_one_notify_per_queue(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    @queue.task(queue="mail")
    async def send(to: str) -> None: ...

    @queue.task(queue="sms")
    async def text(to: str) -> None: ...

    specs = [send.bind(f"{i}@example.com") for i in range(500)]
    specs += [text.bind("+4700000000"), send.options(delay=61).bind("later@example.com")]
    specs.append(TaskRef(name="remote.task", queue="mail").bind(x=1))
    listener = await _listen(database_dsn, queue.channel)
    try:
        async with conn.transaction():
            jobs = await queue.enqueue_many(conn, specs)
        assert sorted(await _notifications(listener, 0.3)) == ["mail", "sms"]
    finally:
        await listener.close()
    assert [j.task for j in jobs] == [s.task for s in specs]
    assert [j.id for j in jobs] == sorted(j.id for j in jobs)
    assert await count_jobs(queue) == 503
    assert await count_jobs(queue, "state = 'scheduled'") == 1
    assert await queue.enqueue_many(conn, []) == []


async def test_enqueue_many_of_one_task_and_options_writes_what_each_enqueue_would(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    """Jobs that differ only in their arguments take a leaner statement: same rows, same jobs."""

    @queue.task(queue="mail", priority=3, retry=pgoutbox.RetryPolicy(max_attempts=4))
    async def send(to: str, n: int = 0) -> None: ...

    hour = datetime.now(UTC) + timedelta(hours=1)
    batches = {
        "due": [send.bind(f"{i}@example.com", n=i) for i in range(300)],
        "delayed": [send.options(delay=61).bind("d", n=i) for i in range(3)],
        "soon": [send.options(delay=30).bind("s", n=i) for i in range(3)],
        "at": [
            msgspec.structs.replace(send.options(run_at=hour).bind("e", n=i), headers={"t": "1"})
            for i in range(3)
        ],
    }
    listener = await _listen(database_dsn, queue.channel)
    try:
        jobs: dict[str, list[pgoutbox.Job]] = {}
        for name, specs in batches.items():
            async with conn.transaction():
                jobs[name] = await queue.enqueue_many(conn, specs)
            assert len({j.run_at for j in jobs[name]}) == 1
        # Due now, and due within a minute: see test_enqueue_of_a_job_due_within_a_minute_notifies.
        assert await _notifications(listener, 0.3) == ["mail", "mail"]
    finally:
        await listener.close()
    for name, specs in batches.items():
        assert [j.id for j in jobs[name]] == sorted(j.id for j in jobs[name])
        for spec, job in zip(specs, jobs[name], strict=True):
            record = await queue.get_job(job.id)
            assert record is not None
            assert (record.task, record.queue, record.priority, record.max_attempts) == (
                send.name,
                "mail",
                3,
                4,
            )
            assert msgspec.json.decode(record.args) == msgspec.json.decode(spec.args)
            assert record.run_at == job.run_at
    assert {(await queue.get_job(j.id)).state for j in jobs["due"]} == {  # type: ignore[union-attr]
        pgoutbox.JobState.AVAILABLE
    }
    assert jobs["at"][0].run_at == hour
    delayed = jobs["delayed"][0].run_at - jobs["due"][0].run_at
    assert timedelta(seconds=60) < delayed < timedelta(seconds=120)
    assert await count_jobs(queue, "state = 'scheduled'") == 9
    assert await count_jobs(queue, 'headers = \'{"t": "1"}\'') == 3


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "no-notify"])
async def test_a_run_at_already_past_is_kept_as_given(
    queue: Queue, conn: pgoutbox.Connection[Any], notify: bool
) -> None:
    # It orders the job among those waiting; with a NOTIFY it was stored as now().
    producer = Queue(queue.conninfo, schema=queue.schema, notify=notify)

    @producer.task
    async def send(to: str) -> None: ...

    past = datetime(2020, 1, 1, tzinfo=UTC)
    async with conn.transaction():
        job = await producer.enqueue(conn, send.options(run_at=past), "a")
        [many] = await producer.enqueue_many(conn, [send.options(run_at=past).bind("b")])
    for handle in (job, many):
        record = await queue.get_job(handle.id)
        assert record is not None
        assert (handle.run_at, record.run_at, record.state) == (
            past,
            past,
            pgoutbox.JobState.AVAILABLE,
        )


async def test_enqueue_many_keeps_run_ats_that_differ_only_in_fold_apart(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    """01:30 on the night clocks go back comes twice; `==` says the two are equal."""

    @queue.task
    async def send(to: str) -> None: ...

    new_york = ZoneInfo("America/New_York")
    first = datetime(2030, 11, 3, 1, 30, tzinfo=new_york)
    second = first.replace(fold=1)
    assert first == second  # Python's comparison, which the batch must not trust
    async with conn.transaction():
        jobs = await queue.enqueue_many(
            conn, [send.options(run_at=at).bind("a") for at in (first, second)]
        )
    assert jobs[1].run_at - jobs[0].run_at == timedelta(hours=1)


async def test_enqueue_many_rolls_back_with_the_transaction(
    queue: Queue, conn: pgoutbox.Connection[Any]
) -> None:
    @queue.task
    async def send(to: str) -> None: ...

    with pytest.raises(PayloadError, match="to"):
        send.bind(to=7)  # type: ignore[arg-type]

    async def enqueue_then_abort() -> None:
        async with conn.transaction():
            await queue.enqueue_many(conn, [send.bind("a"), send.bind("b")])
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        await enqueue_then_abort()
    assert await count_jobs(queue) == 0


_SPEC = {"task": "made.by.hand", "queue": "default", "priority": 0, "max_attempts": 3}


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"queue": "bad queue!"}, ConfigurationError, "queue name"),
        ({"task": ""}, ConfigurationError, "task name"),
        ({"priority": 40_000}, ConfigurationError, "priority"),
        ({"max_attempts": 0}, ConfigurationError, "max_attempts"),
        ({"delay": float("nan")}, ConfigurationError, "delay"),
        ({"run_at": datetime(2030, 1, 1)}, ConfigurationError, "timezone-aware"),  # noqa: DTZ001
        ({"headers": {"trace": "a\x00b"}}, ConfigurationError, "headers"),
        ({"args": "[1, 2]"}, PayloadError, "one JSON object"),
        ({"args": "{not json}"}, PayloadError, "one JSON object"),
        ({"args": '{"a": 1},"task": "Other Name!","z": {}'}, PayloadError, "one JSON object"),
        ({"args": '{"a": "\\u0000"}'}, PayloadError, "one JSON object"),
    ],
)
async def test_enqueue_many_checks_a_hand_made_job_spec_and_writes_nothing(
    queue: Queue,
    conn: pgoutbox.Connection[Any],
    changes: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    fine = pgoutbox.JobSpec(args='{"n": 1}', **_SPEC)
    bad = msgspec.structs.replace(fine, **changes)
    await conn.set_autocommit(True)
    with pytest.raises(error, match=match):
        await queue.enqueue_many(conn, [fine, bad])
    assert await count_jobs(queue) == 0


async def test_enqueue_many_refuses_args_that_hold_two_objects_and_writes_nothing(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    # Joined into the one array of a batch of one task, they would make two rows,
    # or two of them one row.
    specs = [
        pgoutbox.JobSpec(args='{"n": 1},{"n": 2}', **_SPEC),
        pgoutbox.JobSpec(args='{"x": [{}', **_SPEC),
        pgoutbox.JobSpec(args="{}]}", **_SPEC),
    ]
    await conn.set_autocommit(True)
    listener = await _listen(database_dsn, queue.channel)
    try:
        with pytest.raises(PayloadError, match="one JSON object"):
            await queue.enqueue_many(conn, specs)
        assert await _notifications(listener, 0.3) == []
    finally:
        await listener.close()
    assert await count_jobs(queue) == 0


async def test_enqueue_without_notify_still_reaches_polling_workers(
    queue: Queue, conn: pgoutbox.Connection[Any], database_dsn: str
) -> None:
    quiet = Queue(queue.conninfo, schema=queue.schema, notify=False)

    @quiet.task
    async def send(to: str) -> None: ...

    listener = await _listen(database_dsn, queue.channel)
    try:
        async with conn.transaction():
            await quiet.enqueue(conn, send, "a@example.com")
            await quiet.enqueue_many(conn, [send.bind("b@example.com")])
        assert await _notifications(listener, 0.3) == []
    finally:
        await listener.close()
    assert await count_jobs(queue, "state = 'available'") == 2
