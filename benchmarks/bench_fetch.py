"""What an idle worker's fetch costs next to many jobs it does not claim.

Run: ``python benchmarks/bench_fetch.py [--dsn DSN] [--waiting 100000] [--fetches 300]``.

An idle worker's fetch claims the one job that woke it and comes back short.
For each case below, a fresh ``jobs`` table holds `waiting` jobs of one kind,
and the loop enqueues one job of the worker's task and times the worker's
fetch statement (``job_claim``, up to 10 jobs) that claims it, `fetches`
times, on one autocommit connection:

``alone``
    nothing else waits: the baseline.
``delayed``
    jobs of the worker's own queue and task, due in a day (kept out of the
    fetch's index since schema version 8).
``nobody runs``
    due jobs of a task that no registered worker runs, ahead of the worker's
    job in fetch order (set aside at the first fetches since version 9; the
    time those first fetches took, at 400 free slots each, is printed apart).
``other worker``
    due jobs of a task that another registered worker runs, ahead of the
    worker's job: read past at every fetch (a known limitation).

Prints the median and 90th percentile of the fetch's round trip, in
milliseconds, for the schema of the pgoutbox on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any, Final

import anyio
from _scratch import add_dsn_option, throwaway_database
from psycopg import sql

import pgoutbox
from pgoutbox import _store

CASES: Final = ("alone", "delayed", "nobody runs", "other worker")
TASK: Final = "bench.t"
OTHER: Final = "bench.other"
SETUP_SLOTS: Final = 400
"""Free slots of the idle worker's first fetches, which set jobs aside."""


async def _fill(conn: pgoutbox.Connection[Any], queue: pgoutbox.Queue, case: str, n: int) -> None:
    jobs = sql.Identifier(queue.schema, "jobs")
    await conn.execute(sql.SQL("TRUNCATE {}").format(jobs))
    if case != "alone":
        task, state, due_in = {
            "delayed": (TASK, "scheduled", 86_400),
            "nobody runs": ("bench.nobody", "available", -3_600),
            "other worker": (OTHER, "available", -3_600),
        }[case]
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (queue, task, args, state, run_at, max_attempts)"
                " SELECT 'default', %s, '{{}}', %s::text::{}, now() + %s * interval '1 s', 3"
                " FROM generate_series(1, %s)"
            ).format(jobs, sql.Identifier(queue.schema, "job_state")),
            [task, state, due_in, n],
        )
    await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(jobs))


async def _claim(
    conn: pgoutbox.Connection[Any], queue: pgoutbox.Queue, worker: str, limit: int
) -> tuple[int, float | None]:
    claimed, _, next_due = await _store.job_claim(
        conn,
        queue.statements,
        queues=["default"],
        tasks=[TASK],
        limit=limit,
        worker_id=worker,
        claim_id=str(uuid.uuid4()),
    )
    return len(claimed), next_due


async def _case(
    conn: pgoutbox.Connection[Any], queue: pgoutbox.Queue, case: str, waiting: int, fetches: int
) -> tuple[list[float], float]:
    """Fetch round trips (ms), and the time the first fetches took to set jobs aside (s)."""
    await _fill(conn, queue, case, waiting)
    worker = str(uuid.uuid4())
    started = time.perf_counter()
    while (await _claim(conn, queue, worker, SETUP_SLOTS))[1] == 0.0:
        pass  # jobs were set aside and the fetch came back short: fetch again, as a worker does
    setup = time.perf_counter() - started
    job = pgoutbox.TaskRef(name=TASK).bind()
    times: list[float] = []
    for _ in range(fetches):
        await _store.job_insert(conn, queue.statements, job, channel=None)
        started = time.perf_counter()
        claimed, _ = await _claim(conn, queue, worker, 10)
        times.append((time.perf_counter() - started) * 1e3)
        if claimed != 1:
            raise RuntimeError(f"{case}: a fetch claimed {claimed} jobs, not 1")
    return times, setup


async def main(dsn: str, waiting: int, fetches: int) -> None:
    async with throwaway_database(dsn, "pgoutbox_fetch_") as db:
        queue = pgoutbox.Queue(db, schema="bench_fetch")
        async with queue:
            await queue.migrate()
        async with await pgoutbox.connect(db, autocommit=True) as conn:
            for task in (TASK, OTHER):
                await _store.worker_register(
                    conn,
                    queue.statements,
                    worker_id=str(uuid.uuid4()),
                    hostname="bench",
                    pid=os.getpid(),
                    queues=["default"],
                    tasks=[task],
                    concurrency=SETUP_SLOTS,
                    heartbeat_timeout=3600.0,
                )
            cur = await conn.execute(
                sql.SQL("SELECT max(version) FROM {}").format(
                    sql.Identifier(queue.schema, "migrations")
                )
            )
            row = await cur.fetchone()
            print(
                f"schema version {row[0] if row else '?'}; {waiting:,} jobs waiting; "
                f"{fetches} fetches of one job each (round trip, ms)"
            )
            print(f"{'case':14} {'median':>8} {'p90':>8} {'set aside (s)':>14}")
            for case in CASES:
                times, setup = await _case(conn, queue, case, waiting, fetches)
                p90 = statistics.quantiles(times, n=10)[-1]
                print(f"{case:14} {statistics.median(times):>8.3f} {p90:>8.3f} {setup:>14.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_dsn_option(parser)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--fetches", type=int, default=300)
    ns = parser.parse_args()
    anyio.run(main, ns.dsn, ns.waiting, ns.fetches)
