"""Running a worker inside a test, and waiting on what its handlers record."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
from psycopg import sql

import pgoutbox

WAIT_TIMEOUT = 15.0
"""The longest any test waits for something to happen; it fails after that."""


class Recorder:
    """Collects what handlers saw, and lets a test wait until enough arrived."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._changed = anyio.Event()

    def record(self, item: Any) -> None:
        self.calls.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int, timeout: float = WAIT_TIMEOUT) -> list[Any]:  # noqa: ASYNC109
        """Wait until `count` calls were recorded (fails after `timeout` seconds)."""
        with anyio.fail_after(timeout):
            while len(self.calls) < count:
                await self._changed.wait()
        return self.calls


@asynccontextmanager
async def running(
    worker: pgoutbox.Worker,
    *,
    timeout: float = WAIT_TIMEOUT,  # noqa: ASYNC109 (bounds the wait for run() to return)
) -> AsyncIterator[None]:
    """Run `worker` for the block; stop it gracefully and wait for `run()` to return."""
    done = anyio.Event()

    async def run() -> None:
        try:
            await worker.run()
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield
        finally:
            worker.stop()
            with anyio.fail_after(timeout, shield=True):
                await done.wait()


async def count_jobs(queue: pgoutbox.Queue, where: str = "true") -> int:
    """Rows in the queue's jobs table matching a fixed SQL condition written by the test."""
    async with queue.connection() as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {queue.schema}.jobs WHERE {where}")  # noqa: S608 (test-owned SQL)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


class LogWatcher(logging.Handler):
    """Collects pgoutbox log records and lets a test wait for an event name."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = anyio.Event()

    def events(self) -> list[str]:
        return [getattr(r, "event", "") for r in self.records]

    async def wait_for_event(
        self,
        event: str,
        count: int = 1,
        timeout: float = WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> None:
        """Wait until `count` records with this `event` were logged (fails after `timeout` s)."""
        with anyio.fail_after(timeout):
            while self.events().count(event) < count:
                await self._changed.wait()


@contextmanager
def watching_logs(name: str = "pgoutbox") -> Iterator[LogWatcher]:
    """Attach a `LogWatcher` to logger `name` for the block."""
    watcher = LogWatcher()
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.DEBUG)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(old_level)


async def until_waiting_for_a_lock(conn: pgoutbox.Connection[Any], pid: int) -> None:
    """Wait (on the server, at most 15 s) until backend `pid` waits for a lock.

    The loop runs on the server, where `pg_locks` shows the wait as it happens.
    """
    await conn.execute(
        sql.SQL(
            "DO $$ BEGIN"
            " WHILE NOT EXISTS (SELECT FROM pg_locks WHERE pid = {} AND NOT granted) LOOP"
            " PERFORM pg_sleep(0.005);"
            " IF clock_timestamp() > statement_timestamp() + interval '15 s' THEN"
            " RAISE 'backend {} never waited for a lock'; END IF;"
            " END LOOP; END $$"
        ).format(sql.Literal(pid), sql.SQL(str(pid)))
    )
