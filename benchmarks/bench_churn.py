"""How a fetch slows down with the jobs claimed since the table's last vacuum.

Run: ``python benchmarks/bench_churn.py [--dsn DSN] [--jobs 500000] [--vacuum-every N]``.

A claimed job leaves a dead entry in the index the fetch scans, at its head,
until VACUUM removes it. A scan marks the entries it finds dead, and skips
them cheaply after that, but it still reads every index page they fill, so
each fetch costs more than the last until the table is vacuumed. Autovacuum
visits a database at most once every ``autovacuum_naptime`` (1 minute by
default).

Two loops drain `jobs` pre-loaded rows on one connection, with autovacuum
off for their table, and print their throughput over each tenth of the
drain: pgoutbox's fetch statement (200 jobs each, completing the previous
batch, as a worker with ``completed_retention=0`` sends it) and the
yardstick's ``DELETE ... FOR UPDATE SKIP LOCKED`` (100 each). With
``--vacuum-every N``, each loop runs ``VACUUM`` on its table after every N
jobs, as an operator's schedule or a lower ``autovacuum_naptime`` would.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
from _scratch import add_dsn_option, throwaway_database
from bench_claim import TASK, FetchLoop
from psycopg import sql

import pgoutbox
from pgoutbox import _store

PGOUTBOX_BATCH: Final = 200
YARDSTICK_FETCH: Final = (
    "DELETE FROM q WHERE id IN (SELECT id FROM q ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) "
    "RETURNING id, (payload->>'i')::int8"
)

Fetch = Callable[[], Awaitable[int]]
"""One fetch of a loop: returns how many jobs it took."""


async def _drain(
    conn: pgoutbox.Connection[Any], name: str, table: str, fetch: Fetch, *, jobs: int, every: int
) -> None:
    """Run `fetch` until the table is empty, printing the rate over each tenth."""
    done = mark = vacuumed = 0
    tenth = max(1, jobs // 10)
    started = time.perf_counter()
    while True:
        took = await fetch()
        done += took
        if every and done - vacuumed >= every:
            await conn.execute(sql.SQL("VACUUM {}").format(sql.SQL(table)))
            vacuumed = done
        if done - mark >= tenth or (not took and done > mark):
            now = time.perf_counter()
            print(f"  {name:9} {done:>9,} jobs: {(done - mark) / (now - started):>9,.0f} jobs/s")
            mark, started = done, now
        if not took:
            return


async def _pgoutbox(dsn: str, conn: pgoutbox.Connection[Any], jobs: int, every: int) -> None:
    queue = pgoutbox.Queue(dsn, schema="churn")
    async with queue:
        await queue.migrate()
    st = queue.statements
    await conn.execute("ALTER TABLE churn.jobs SET (autovacuum_enabled = off)")
    worker_id = str(uuid.uuid4())
    await _store.worker_register(
        conn,
        st,
        worker_id=worker_id,
        hostname="bench",
        pid=os.getpid(),
        queues=["default"],
        tasks=[TASK],
        concurrency=2 * PGOUTBOX_BATCH,
        heartbeat_timeout=3600.0,
    )
    await conn.execute(
        "INSERT INTO churn.jobs (queue, task, args, max_attempts) "
        "SELECT 'default', %s, jsonb_build_object('i', g), 5 FROM generate_series(1, %s) g",
        [TASK, jobs],
    )
    await conn.execute("VACUUM ANALYZE churn.jobs")
    loop = FetchLoop(conn, st, worker_id)

    async def fetch() -> int:
        return await loop.fetch(PGOUTBOX_BATCH)

    await _drain(conn, "pgoutbox", "churn.jobs", fetch, jobs=jobs, every=every)


async def _yardstick(conn: pgoutbox.Connection[Any], jobs: int, every: int) -> None:
    await conn.execute(
        "CREATE TABLE q (id bigserial PRIMARY KEY, payload jsonb NOT NULL) "
        "WITH (autovacuum_enabled = off)"
    )
    await conn.execute(
        "INSERT INTO q (payload) SELECT jsonb_build_object('i', g) FROM generate_series(1, %s) g",
        [jobs],
    )
    await conn.execute("VACUUM ANALYZE q")

    async def fetch() -> int:
        cur = await conn.execute(YARDSTICK_FETCH)
        return len(await cur.fetchall())

    await _drain(conn, "yardstick", "q", fetch, jobs=jobs, every=every)


async def main(dsn: str, jobs: int, every: int) -> None:
    async with (
        throwaway_database(dsn, "pgoutbox_churn_") as db,
        await pgoutbox.connect(db, autocommit=True) as conn,
    ):
        print(
            f"{jobs:,} jobs, autovacuum off, VACUUM every {every:,} jobs"
            if every
            else f"{jobs:,} jobs, autovacuum off, no VACUUM"
        )
        await _pgoutbox(db, conn, jobs, every)
        await _yardstick(conn, jobs, every)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_dsn_option(parser)
    parser.add_argument("--jobs", type=int, default=500_000)
    parser.add_argument("--vacuum-every", type=int, default=0, metavar="N")
    ns = parser.parse_args()
    anyio.run(main, ns.dsn, ns.jobs, ns.vacuum_every)
