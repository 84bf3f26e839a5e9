"""How a fetch slows down with the jobs claimed since the table's last vacuum.

Run: ``python benchmarks/bench_churn.py [--dsn DSN] [--jobs 500000] [--vacuum-every N]``,
or ``python benchmarks/bench_churn.py --worker [--jobs 500000]``.

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

With ``--worker``, a real worker process drains them instead (concurrency 400,
``completed_retention=0``, no-op handlers, autovacuum on), twice: with
``vacuum_threshold=0``, which never vacuums, and with the default, which lets
its maintenance rounds (every 5 s) vacuum the table once it holds that many
dead rows.
"""

from __future__ import annotations

import argparse
import itertools
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
import pgoutbox.worker
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


async def _worker_drain(dsn: str, jobs: int, vacuum_threshold: int) -> None:
    """Drain `jobs` pre-loaded no-op jobs with a `Worker`; print the rate of each tenth."""
    async with throwaway_database(dsn, "pgoutbox_churn_") as db:
        queue = pgoutbox.Queue(db)
        tenth = max(1, jobs // 10)
        marks: list[float] = []
        ran = 0
        all_ran = anyio.Event()

        @queue.task(name=TASK)
        async def noop(i: int) -> None:
            nonlocal ran
            ran += 1
            if ran % tenth == 0:
                marks.append(time.perf_counter())
            if ran == jobs:
                all_ran.set()

        async with queue:
            await queue.migrate()
            async with await pgoutbox.connect(db, autocommit=True) as conn:
                await conn.execute(
                    "INSERT INTO pgoutbox.jobs (queue, task, args, max_attempts) "
                    "SELECT 'default', %s, jsonb_build_object('i', g), 5 "
                    "FROM generate_series(1, %s) g",
                    [TASK, jobs],
                )
                await conn.execute("VACUUM ANALYZE pgoutbox.jobs")
            worker = pgoutbox.Worker(
                queue, concurrency=400, completed_retention=0, vacuum_threshold=vacuum_threshold
            )
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await all_ran.wait()
                worker.stop()
    edges = [started, *marks]
    rates = [f"{tenth / (b - a):,.0f}" for a, b in itertools.pairwise(edges)]
    print(
        f"  vacuum_threshold={vacuum_threshold:,}: {jobs / (marks[-1] - started):,.0f} jobs/s, "
        f"{worker.statistics().vacuums} vacuums; each tenth: {', '.join(rates)}"
    )


async def main(dsn: str, jobs: int, every: int, worker: bool) -> None:
    if worker:
        print(f"{jobs:,} jobs drained by a worker process, autovacuum on")
        for threshold in (0, pgoutbox.worker.DEFAULT_VACUUM_THRESHOLD):
            await _worker_drain(dsn, jobs, threshold)
        return
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
    parser.add_argument("--worker", action="store_true", help="drain with a real worker")
    ns = parser.parse_args()
    anyio.run(main, ns.dsn, ns.jobs, ns.vacuum_every, ns.worker)
