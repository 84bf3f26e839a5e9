"""The yardstick: a minimal hand-written psycopg queue, as fast as a queue can be.

One table ``q (id bigserial, payload jsonb)``; enqueue is one INSERT (with a
``pg_notify`` in the same statement), bulk enqueue is COPY plus one NOTIFY.
Each worker process runs one loop on one connection::

    DELETE FROM q WHERE id IN (
        SELECT id FROM q ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED
    ) RETURNING ...

calls the no-op handler for each row, and when a batch comes back short waits
for a NOTIFY (on a second connection) or 1 s. No retries, no heartbeats, no
history: a job deleted by a worker that then dies is lost (at-most-once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb

from . import Probe, Producer, System

BATCH: Final = 100
"""Rows per fetch: the LIMIT in `FETCH`."""
CHANNEL: Final = "q_new"
"""The NOTIFY channel named in `INSERT_NOTIFY`."""
POLL_INTERVAL: Final = 1.0

CREATE: Final = "CREATE TABLE q (id bigserial PRIMARY KEY, payload jsonb NOT NULL)"
INSERT_NOTIFY: Final = (
    "WITH j AS (INSERT INTO q (payload) VALUES (%s) RETURNING id) "
    "SELECT pg_notify('q_new', '') FROM j"
)
INSERT: Final = "INSERT INTO q (payload) VALUES (%s)"
FETCH: Final = (
    "DELETE FROM q WHERE id IN ("
    "SELECT id FROM q ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED"
    ") RETURNING id, (payload->>'i')::int8"
)


class YardstickProducer(Producer):
    def __init__(self, conn: psycopg.AsyncConnection[Any], *, notify: bool) -> None:
        self._conn = conn
        self._notify = notify

    async def enqueue_one(self, i: int) -> None:
        await self._conn.execute(INSERT_NOTIFY if self._notify else INSERT, (Jsonb({"i": i}),))

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        async with self._conn.transaction():
            async with self._conn.cursor().copy("COPY q (payload) FROM STDIN") as copy:
                for i in ids:
                    await copy.write_row((Jsonb({"i": i}),))
            if self._notify:
                await self._conn.execute(f"SELECT pg_notify('{CHANNEL}', '')")

    async def aclose(self) -> None:
        await self._conn.close()


class YardstickSystem(System):
    name = "yardstick"
    bulk_note = "COPY"

    @property
    def config(self) -> str:
        return (
            f"1 loop per process: DELETE … LIMIT {BATCH} FOR UPDATE SKIP LOCKED RETURNING; "
            "LISTEN on a 2nd connection; psycopg on asyncio"
        )

    async def install(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(CREATE)

    async def open_producer(self) -> Producer:
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return YardstickProducer(conn, notify=self.notify)

    async def remaining(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute("SELECT count(*) FROM q")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def run_worker(self, probe: Probe, stop: asyncio.Event, options: dict[str, str]) -> None:
        wake = asyncio.Event()
        async with (
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as listen_conn,
        ):
            await listen_conn.execute(f"LISTEN {CHANNEL}")

            async def listen() -> None:
                async for _ in listen_conn.notifies():
                    wake.set()

            listener = asyncio.create_task(listen())
            try:
                while not stop.is_set():
                    wake.clear()
                    cur = await conn.execute(FETCH)
                    rows = await cur.fetchall()
                    for _id, i in rows:
                        probe.hit(i)
                    if len(rows) < BATCH:
                        waiters = [
                            asyncio.create_task(wake.wait()),
                            asyncio.create_task(stop.wait()),
                        ]
                        await asyncio.wait(
                            waiters, timeout=POLL_INTERVAL, return_when=asyncio.FIRST_COMPLETED
                        )
                        for waiter in waiters:
                            waiter.cancel()
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                    await listener
