"""procrastinate: `defer_async` per job, `batch_defer_async` per batch, worker with concurrency.

Driven as its docs recommend for throughput: an async task, a worker with
``concurrency`` (its docs' example uses 30), LISTEN/NOTIFY on (the default),
several worker processes. Each producer is an `App` on a one-connection pool,
so that, as for the other systems, every producer has a connection of its own.
On the 2-core benchmark machine concurrency 1, 10, 30 and 100 with pools of 4
to 32 connections all drained at 200-280 jobs/s; the docs' 30 is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import procrastinate
import psycopg
from procrastinate.types import JSONDict

from . import TASK_NAME, Probe, Producer, System

CONCURRENCY: Final = 30
"""Jobs a worker runs at once (the value of its docs' concurrency example)."""

POOL_SIZE: Final = 10
"""Connections in a worker process's pool (fetch, finish, LISTEN, heartbeats)."""

NOTIFY_TRIGGER: Final = "procrastinate_jobs_notify_queue_job_inserted_v1"


def make_app(dsn: str, pool_size: int, probe: Probe | None = None) -> procrastinate.App:
    """An `App` on a pool of `pool_size` connections, with the no-op task registered."""
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=dsn, min_size=pool_size, max_size=pool_size
        )
    )

    @app.task(name=TASK_NAME)
    async def noop(i: int) -> None:
        if probe is not None:
            probe.hit(i)

    return app


class ProcrastinateProducer(Producer):
    def __init__(self, app: procrastinate.App) -> None:
        self._app = app
        self._task = app.tasks[TASK_NAME]

    async def enqueue_one(self, i: int) -> None:
        await self._task.defer_async(i=i)

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        jobs: list[JSONDict] = [{"i": i} for i in ids]
        await self._task.batch_defer_async(*jobs)

    async def aclose(self) -> None:
        await self._app.close_async()


class ProcrastinateSystem(System):
    name = "procrastinate"
    bulk_note = "batch_defer_async (one statement)"

    @property
    def config(self) -> str:
        return (
            f"worker concurrency={CONCURRENCY}, pool of {POOL_SIZE}, listen_notify on; "
            "psycopg on asyncio"
        )

    async def install(self) -> None:
        app = make_app(self.dsn, 1)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def disable_notify(self) -> None:
        await super().disable_notify()
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f"ALTER TABLE procrastinate_jobs DISABLE TRIGGER {NOTIFY_TRIGGER}")

    async def open_producer(self) -> Producer:
        app = make_app(self.dsn, 1)
        await app.open_async()
        return ProcrastinateProducer(app)

    async def remaining(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def run_worker(self, probe: Probe, stop: asyncio.Event, options: dict[str, str]) -> None:
        app = make_app(self.dsn, POOL_SIZE, probe)
        async with app.open_async():
            worker = asyncio.create_task(
                app.run_worker_async(concurrency=CONCURRENCY, install_signal_handlers=False)
            )
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([worker, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not worker.done():
                worker.cancel()  # procrastinate's graceful stop: finish running jobs
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            stopper.cancel()
