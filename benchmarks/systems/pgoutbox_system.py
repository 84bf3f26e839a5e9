"""pgoutbox: `Queue.enqueue` per job, `Queue.enqueue_many` per batch, `Worker` per process.

Producers enqueue on a plain psycopg `AsyncConnection` (autocommit: the one
INSERT+NOTIFY statement is the transaction), as an asyncio application would.
Each worker process runs one `Worker` on anyio's asyncio backend, as ``python
-m pgoutbox.worker`` does by default, configured as the docs advise for many
short jobs (docs/how-to/throughput.md): a high concurrency, since a fetch
under a backlog claims half the slots, and ``completed_retention=0``, which
deletes each job as it completes. A sweep on the 2-core benchmark machine
(drain, 50k jobs, medians of 3) gave 1/2 processes: concurrency 200:
40.9k/49.1k jobs/s, 400: 52.9k/58.7k, 800: 56.3k/67.4k; 400 is kept (more
buys little and holds more jobs per process). Completed jobs kept for an
hour (the default) cost about a fifth: 42.0k/48.8k at 400.
``PGOUTBOX_BENCH_CONCURRENCY`` and ``PGOUTBOX_BENCH_COMPLETED_RETENTION``
override both for such sweeps.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Sequence
from typing import Any, Final

import anyio
import psycopg
from psycopg import sql

import pgoutbox

from . import TASK_NAME, Probe, Producer, System

SCHEMA: Final = "pgoutbox"
CONCURRENCY: Final = int(os.environ.get("PGOUTBOX_BENCH_CONCURRENCY", "400"))
"""Jobs a worker runs at once (and claims per fetch at most)."""

COMPLETED_RETENTION: Final = float(os.environ.get("PGOUTBOX_BENCH_COMPLETED_RETENTION", "0"))
"""Seconds completed jobs are kept: 0 deletes each as it completes."""

NO_NOTIFY_DELAY: Final = 1e-6
"""Without ``Queue(notify=False)`` (older trees): a delay this small writes the
same row but takes the insert path without NOTIFY."""


def make_queue(
    dsn: str, probe: Probe | None = None, *, notify: bool = True
) -> tuple[pgoutbox.Queue, pgoutbox.Task[Any, Any]]:
    """The queue, with the no-op task registered (reporting to `probe` if given)."""
    if notify or "notify" not in inspect.signature(pgoutbox.Queue).parameters:
        queue = pgoutbox.Queue(dsn, schema=SCHEMA)
    else:
        queue = pgoutbox.Queue(dsn, schema=SCHEMA, notify=False)

    async def noop(i: int) -> None:
        if probe is not None:
            probe.hit(i)

    return queue, queue.task(name=TASK_NAME)(noop)


class PgoutboxProducer(Producer):
    """Enqueues on a plain psycopg `AsyncConnection` in autocommit, as an app would."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        queue: pgoutbox.Queue,
        task: pgoutbox.Task[Any, Any],
    ) -> None:
        self._conn = conn
        self._queue = queue
        self._task = task
        self._has_many = hasattr(queue, "enqueue_many") and hasattr(task, "bind")

    async def enqueue_one(self, i: int) -> None:
        # Autocommit: the single INSERT(+NOTIFY) statement is its own transaction.
        await self._queue.enqueue(self._conn, self._task, i)

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        async with self._conn.transaction():
            if self._has_many:
                await self._queue.enqueue_many(self._conn, [self._task.bind(i) for i in ids])
            else:  # older pgoutbox: one statement per job in one transaction
                for i in ids:
                    await self._queue.enqueue(self._conn, self._task, i)

    async def aclose(self) -> None:
        await self._conn.close()


class PgoutboxSystem(System):
    """pgoutbox at the working tree's version."""

    name = "pgoutbox"

    def __init__(self) -> None:
        super().__init__()
        has_many = hasattr(pgoutbox.Queue, "enqueue_many")
        self.bulk_note = (
            "Queue.enqueue_many" if has_many else "loop of Queue.enqueue in one transaction"
        )

    @property
    def config(self) -> str:
        return (
            f"Worker(concurrency={CONCURRENCY}, completed_retention={COMPLETED_RETENTION:g}), "
            "default poll interval; anyio on asyncio"
        )

    async def install(self) -> None:
        queue, _ = make_queue(self.dsn)
        async with queue:
            await queue.migrate()

    async def open_producer(self) -> Producer:
        queue, task = make_queue(self.dsn, notify=self.notify)
        if not self.notify and not hasattr(queue, "notify"):
            # Before Queue(notify=False): a tiny delay takes the insert path without NOTIFY.
            task = task.options(delay=NO_NOTIFY_DELAY)
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return PgoutboxProducer(conn, queue, task)

    async def remaining(self, conn: psycopg.AsyncConnection[Any]) -> int:
        query = sql.SQL(
            "SELECT count(*) FROM {} WHERE state IN ('scheduled', 'available', 'retryable', "
            "'running')"
        ).format(sql.Identifier(SCHEMA, "jobs"))
        cur = await conn.execute(query)
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def run_worker(self, probe: Probe, stop: asyncio.Event, options: dict[str, str]) -> None:
        queue, _ = make_queue(self.dsn, probe)
        worker = pgoutbox.Worker(
            queue,
            concurrency=int(options.get("concurrency", CONCURRENCY)),
            completed_retention=COMPLETED_RETENTION,
        )

        async def stop_on_request() -> None:
            await stop.wait()
            worker.stop()

        async with queue, anyio.create_task_group() as tg:
            tg.start_soon(stop_on_request)
            await worker.run()
            tg.cancel_scope.cancel()
