"""pgqueuer, on its asyncpg or its psycopg driver.

Driven as its docs advise for throughput: batch `Queries.enqueue` with lists;
`QueueManager.run` with a ``batch_size`` raised for short jobs (its
performance-tuning guide), each manager on a connection of its own (its
benchmark tool runs several per process); uvloop, which ``pgq run`` uses when
installed; ``pgq autovac`` (`Queries.optimize_autovacuum`) after install, as
its tuning checklist asks. The manager count and batch size were picked by a
sweep on the 2-core benchmark machine: 2 x 100 drained ~2x faster than its
benchmark tool's default of 5 x 10, and at least as fast as 1 x 100, 1 x 200
and 2 x 50; a later sweep (2 x 200, 4 x 100, 4 x 200) stayed within noise of
it (17-18k jobs/s with one process, 20-23k with two).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, Literal

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import psycopg
from pgqueuer import AsyncpgDriver, PsycopgDriver, Queries, QueueManager
from pgqueuer.models import Job
from pgqueuer.ports.driver import Driver
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from . import TASK_NAME, Probe, Producer, System

INSTANCES: Final = 2
"""QueueManagers per worker process, each on its own connection."""

BATCH_SIZE: Final = 100
"""Jobs per dequeue (default 10; its guide: raise it for short jobs)."""

DriverName = Literal["asyncpg", "psycopg"]


async def connect_asyncpg(dsn: str) -> asyncpg.Connection:
    """An asyncpg connection from a libpq connection string."""
    params = conninfo_to_dict(dsn)
    return await asyncpg.connect(
        host=params.get("host"),
        port=int(params.get("port") or 5432),
        user=params.get("user"),
        password=params.get("password"),
        database=params.get("dbname"),
    )


class PgqueuerProducer(Producer):
    def __init__(self, queries: Queries, close: Any) -> None:
        self._queries = queries
        self._close = close

    async def enqueue_one(self, i: int) -> None:
        await self._queries.enqueue(TASK_NAME, str(i).encode(), 0)

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        n = len(ids)
        await self._queries.enqueue([TASK_NAME] * n, [str(i).encode() for i in ids], [0] * n)

    async def aclose(self) -> None:
        await self._close()


class PgqueuerSystem(System):
    worker_loop = "uvloop"
    bulk_note = "Queries.enqueue with lists (one statement)"

    def __init__(self, driver: DriverName) -> None:
        super().__init__()
        self.driver: DriverName = driver
        self.name = f"pgqueuer-{driver}"

    @property
    def config(self) -> str:
        return (
            f"{INSTANCES} QueueManagers per process, batch_size={BATCH_SIZE}, "
            f"{self.driver} driver, uvloop; pgq autovac"
        )

    async def _driver(self) -> tuple[Driver, Any]:
        """A driver on a new connection, and the coroutine function that closes it."""
        if self.driver == "asyncpg":
            conn = await connect_asyncpg(self.dsn)
            return AsyncpgDriver(conn), conn.close
        pconn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return PsycopgDriver(pconn), pconn.close

    async def install(self) -> None:
        driver, close = await self._driver()
        try:
            queries = Queries(driver)
            await queries.install()
            await queries.optimize_autovacuum()
        finally:
            await close()

    async def disable_notify(self) -> None:
        await super().disable_notify()
        driver, close = await self._driver()
        try:
            qbe = Queries(driver).qbe.settings
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(
                        sql.Identifier(qbe.queue_table), sql.Identifier(qbe.trigger)
                    )
                )
        finally:
            await close()

    async def open_producer(self) -> Producer:
        driver, close = await self._driver()
        return PgqueuerProducer(Queries(driver), close)

    async def remaining(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute("SELECT count(*) FROM pgqueuer")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def run_worker(self, probe: Probe, stop: asyncio.Event, options: dict[str, str]) -> None:
        managers: list[QueueManager] = []
        closers = []
        for _ in range(INSTANCES):
            driver, close = await self._driver()
            closers.append(close)
            qm = QueueManager(Queries(driver))

            @qm.entrypoint(TASK_NAME)
            async def noop(job: Job) -> None:
                probe.hit(int(job.payload or b"0"))

            managers.append(qm)

        async def stop_on_request() -> None:
            await stop.wait()
            for qm in managers:
                qm.shutdown.set()

        stopper = asyncio.create_task(stop_on_request())
        try:
            await asyncio.gather(*(qm.run(batch_size=BATCH_SIZE) for qm in managers))
        finally:
            stopper.cancel()
            for close in closers:
                await close()
