"""Sync enqueue for sync code (Django, Flask, scripts), on a sync psycopg connection."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import dict_row

import pgoutbox
from pgoutbox import ConfigurationError, JobState, PayloadError, Queue

from ._running import count_jobs

pytestmark = pytest.mark.anyio


async def test_enqueue_sync_commits_and_rolls_back_with_caller(
    queue: Queue, database_dsn: str
) -> None:
    @queue.task
    async def send(to: str) -> None: ...

    with psycopg.connect(database_dsn) as sync_conn:
        with sync_conn.transaction():
            kept = queue.enqueue_sync(sync_conn, send, "a@example.com")
            queue.enqueue_many_sync(sync_conn, [send.bind("b"), send.bind("c")])
        with pytest.raises(PayloadError, match="to"):
            queue.enqueue_sync(sync_conn, send, 7)  # type: ignore[arg-type]
        sync_conn.rollback()

        def enqueue_then_abort() -> None:
            with sync_conn.transaction():
                queue.enqueue_sync(sync_conn, "remote.task", x=1)
                raise RuntimeError("abort")

        with pytest.raises(RuntimeError, match="abort"):
            enqueue_then_abort()
    record = await queue.get_job(kept.id)
    assert record is not None
    assert record.state is JobState.AVAILABLE
    assert await count_jobs(queue) == 3


async def test_enqueue_sync_through_a_client_side_cursor(queue: Queue, database_dsn: str) -> None:
    """Django's psycopg backend binds parameters client-side: enqueue must work there too."""

    @queue.task
    async def send(to: str, delay_hint: float | None = None) -> None: ...

    with (
        psycopg.connect(database_dsn, cursor_factory=psycopg.ClientCursor) as sync_conn,
        sync_conn.transaction(),
    ):
        queue.enqueue_sync(sync_conn, send, "a'); DROP TABLE x; --")
        queue.enqueue_many_sync(sync_conn, [send.bind("b", 1.5), send.options(delay=60).bind("c")])
    assert await count_jobs(queue) == 3
    assert await count_jobs(queue, "state = 'scheduled'") == 1


async def test_enqueue_sync_on_a_connection_with_another_row_factory(
    queue: Queue, database_dsn: str
) -> None:
    @queue.task
    async def send(to: str) -> None: ...

    with psycopg.connect(database_dsn, row_factory=dict_row) as sync_conn:
        one = queue.enqueue_sync(sync_conn, send, "a@example.com")
        many = queue.enqueue_many_sync(sync_conn, [send.bind("b"), send.bind("c")])
    assert [j.id for j in many] == [one.id + 1, one.id + 2]
    assert await count_jobs(queue) == 3


async def test_a_connection_of_the_other_kind_is_refused_before_anything_is_written(
    queue: Queue, database_dsn: str
) -> None:
    # Given a sync connection, the async enqueue would run and commit its
    # statement before failing to await it: a caller that retried would write twice.
    @queue.task
    async def send(to: str) -> None: ...

    with psycopg.connect(database_dsn, autocommit=True) as sync_conn:
        with pytest.raises(ConfigurationError, match="enqueue_sync"):
            await queue.enqueue(sync_conn, send, "a")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="enqueue_many_sync"):
            await queue.enqueue_many(sync_conn, [send.bind("b")])  # type: ignore[arg-type]
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        with pytest.raises(ConfigurationError, match="AsyncConnection"):
            queue.enqueue_sync(conn, send, "c")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="AsyncConnection"):
            queue.enqueue_many_sync(conn, [send.bind("d")])  # type: ignore[arg-type]
    assert await count_jobs(queue) == 0
