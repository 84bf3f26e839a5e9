"""Sync enqueue for sync code (Django, Flask, scripts), on a sync psycopg connection."""

from __future__ import annotations

import psycopg
import pytest

from pgoutbox import JobState, PayloadError, Queue

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
