"""What a durable claim costs the database: fetch loops with no handlers behind them.

Run: ``python benchmarks/bench_claim.py [--dsn DSN] [--jobs 50000] [--batch 100] [--runs 5]``.

Three loops drain `jobs` pre-loaded rows on one autocommit connection, one
statement per batch of `batch` rows, and call nothing per row:

``delete``
    The yardstick's statement: ``DELETE ... FOR UPDATE SKIP LOCKED RETURNING``
    on a two-column table. One write per job, and a job whose worker dies is
    lost (at-most-once).
``claim+delete``
    The least an at-least-once queue writes: each statement marks the next
    batch ``running`` under a worker (a new row version, with an entry in a
    partial index of running rows, so that a dead worker's jobs can be found)
    and deletes the batch before it. Two writes per job, both durable.
``pgoutbox``
    pgoutbox's own fetch statement on its real schema: it claims the next
    batch for a registered worker and deletes the previous one, fenced by
    attempt and claim, exactly as a worker with ``completed_retention=0``
    sends it, only without running jobs in between.
``lock+delete``
    The claim pgoutbox does not make: each batch is locked with ``SELECT ...
    FOR UPDATE SKIP LOCKED`` in a transaction left open, and deleted in it,
    with a commit every 4 batches. It writes a lock, not a row version, and a
    job whose worker dies goes back to the queue with the transaction, but
    its attempt is not counted, the job is not marked as running, and the
    transaction stays open while the jobs run (see docs/benchmarks.md).

The default batch is the yardstick's (100). At 200 on 50,000 rows the planner
turns the ``delete`` statement's ``IN`` into a hash semi-join over a scan of
the whole table, which measures that plan rather than the writes. The loops
alternate within each run, each on a fresh table or schema, in a throw-away
database. The ratio to ``delete`` bounds what any queue that writes its claim
can reach against the yardstick, before Python runs a job.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import anyio
import psycopg
from psycopg import sql

import pgoutbox
from pgoutbox import _store
from pgoutbox._job import JobState, Outcome

LOOPS: Final = ("delete", "claim+delete", "pgoutbox", "lock+delete")
TASK: Final = "bench.noop"

DELETE_TABLE: Final = "CREATE TABLE q1 (id bigserial PRIMARY KEY, payload jsonb NOT NULL)"
DELETE_FETCH: Final = (
    "DELETE FROM q1 WHERE id IN (SELECT id FROM q1 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) "
    "RETURNING id, (payload->>'i')::int8"
)
CLAIM_TABLE: Final = (
    "CREATE TABLE q2 (id bigserial PRIMARY KEY, payload jsonb NOT NULL, "
    "state text NOT NULL DEFAULT 'available', worker text, attempt int NOT NULL DEFAULT 0, "
    "claimed_at timestamptz) WITH (fillfactor = 80);"
    "CREATE INDEX q2_fetch ON q2 (id) WHERE state = 'available';"
    "CREATE INDEX q2_running ON q2 (worker) WHERE state = 'running'"
)
CLAIM_FETCH: Final = (
    "WITH done AS (DELETE FROM q2 WHERE id = ANY(%s) AND state = 'running'), "
    "claimed AS (UPDATE q2 SET state = 'running', worker = %s, attempt = attempt + 1, "
    "claimed_at = now() WHERE id IN (SELECT id FROM q2 WHERE state = 'available' "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, (payload->>'i')::int8) "
    "SELECT * FROM claimed"
)
LOCK_TABLE: Final = CLAIM_TABLE.replace("q2", "q3")
LOCK_FETCH: Final = (
    "SELECT id, (payload->>'i')::int8 FROM q3 WHERE state = 'available' "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
LOCK_DONE: Final = "DELETE FROM q3 WHERE id = ANY(%s)"
LOCK_BATCHES_PER_COMMIT: Final = 4


async def _preload(conn: pgoutbox.Connection[Any], table: str, jobs: int) -> None:
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (payload) "
            "SELECT jsonb_build_object('i', g) FROM generate_series(1, %s) g"
        ).format(sql.Identifier(table)),
        [jobs],
    )
    await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))


async def _delete_loop(conn: pgoutbox.Connection[Any], jobs: int, batch: int) -> float:
    await conn.execute("DROP TABLE IF EXISTS q1")
    await conn.execute(DELETE_TABLE)
    await _preload(conn, "q1", jobs)
    started, done = time.perf_counter(), 0
    while True:
        cur = await conn.execute(DELETE_FETCH, [batch])
        rows = await cur.fetchall()
        done += len(rows)
        if not rows:
            break
    return _rate(done, jobs, started)


async def _claim_delete_loop(conn: pgoutbox.Connection[Any], jobs: int, batch: int) -> float:
    await conn.execute("DROP TABLE IF EXISTS q2")
    await conn.execute(CLAIM_TABLE)
    await _preload(conn, "q2", jobs)
    started, done = time.perf_counter(), 0
    previous: list[int] = []
    while True:
        cur = await conn.execute(CLAIM_FETCH, [previous, "w1", batch])
        previous = [row[0] for row in await cur.fetchall()]
        done += len(previous)
        if not previous:
            break
    return _rate(done, jobs, started)


async def _lock_delete_loop(conn: pgoutbox.Connection[Any], jobs: int, batch: int) -> float:
    await conn.execute("DROP TABLE IF EXISTS q3")
    await conn.execute(LOCK_TABLE)
    await _preload(conn, "q3", jobs)
    started, done, batches = time.perf_counter(), 0, 0
    previous: list[int] = []
    # The connection is in autocommit mode: the loop opens and ends its own
    # transactions, one per LOCK_BATCHES_PER_COMMIT batches.
    await conn.execute("BEGIN")
    while True:
        if previous:
            await conn.execute(LOCK_DONE, [previous])
        cur = await conn.execute(LOCK_FETCH, [batch])
        previous = [row[0] for row in await cur.fetchall()]
        done += len(previous)
        batches += 1
        if not previous:
            break
        if batches % LOCK_BATCHES_PER_COMMIT == 0:
            await conn.execute("COMMIT")
            await conn.execute("BEGIN")
    await conn.execute("COMMIT")
    return _rate(done, jobs, started)


async def _pgoutbox_loop(
    dsn: str, conn: pgoutbox.Connection[Any], jobs: int, batch: int, run: int
) -> float:
    schema = f"claim_bench_{run}"
    queue = pgoutbox.Queue(dsn, schema=schema)
    async with queue:
        await queue.migrate()
    st = queue.statements
    worker_id = str(uuid.uuid4())
    await _store.worker_register(
        conn,
        st,
        worker_id=worker_id,
        hostname="bench",
        pid=os.getpid(),
        queues=["default"],
        tasks=[TASK],
        concurrency=2 * batch,
        heartbeat_timeout=3600.0,
    )
    table = sql.Identifier(schema, "jobs")
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (queue, task, args, priority, state, max_attempts) "
            "SELECT 'default', %s, jsonb_build_object('i', g), 0, 'available', 20 "
            "FROM generate_series(1, %s) g"
        ).format(table),
        [TASK, jobs],
    )
    await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
    started, done = time.perf_counter(), 0
    previous: list[Outcome] = []
    while True:
        claim_id = str(uuid.uuid4())
        claimed, _, _ = await _store.job_claim(
            conn,
            st,
            queues=["default"],
            tasks=[TASK],
            limit=batch,
            worker_id=worker_id,
            claim_id=claim_id,
            completed=previous,
            keep_completed=False,
        )
        previous = [
            Outcome(job.id, job.attempt, JobState.COMPLETED, claim_id=job.claim_id)
            for job in claimed
        ]
        done += len(claimed)
        if not claimed:
            break
    rate = _rate(done, jobs, started)
    await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return rate


def _rate(done: int, jobs: int, started: float) -> float:
    elapsed = time.perf_counter() - started
    if done != jobs:
        raise RuntimeError(f"drained {done} of {jobs} rows")
    return jobs / elapsed


async def main(dsn: str, jobs: int, batch: int, runs: int) -> None:
    name = f"pgoutbox_claim_{secrets.token_hex(4)}"
    async with await pgoutbox.connect(dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    results: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    try:
        db = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        async with await pgoutbox.connect(db, autocommit=True) as conn:
            for run in range(runs):
                results["delete"].append(await _delete_loop(conn, jobs, batch))
                results["claim+delete"].append(await _claim_delete_loop(conn, jobs, batch))
                results["pgoutbox"].append(await _pgoutbox_loop(db, conn, jobs, batch, run))
                results["lock+delete"].append(await _lock_delete_loop(conn, jobs, batch))
    finally:
        async with await pgoutbox.connect(dsn, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    print(report(results, jobs, batch, runs))


def report(results: Mapping[str, Sequence[float]], jobs: int, batch: int, runs: int) -> str:
    """The table: jobs/s (median, min-max), µs per job, and the ratio to ``delete``."""
    base = statistics.median(results["delete"])
    lines = [
        f"{jobs:,} rows, {batch} per statement, {runs} runs (median, min-max), no handlers",
        f"{'loop':14} {'jobs/s':>10} {'min-max':>17} {'µs/job':>7} {'÷ delete':>9}",
    ]
    for loop, rates in results.items():
        median = statistics.median(rates)
        lines.append(
            f"{loop:14} {median:>10,.0f} {min(rates):>8,.0f}-{max(rates):<8,.0f} "
            f"{1e6 / median:>7.1f} {median / base:>9.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "PGOUTBOX_BENCH_DSN", "host=127.0.0.1 user=postgres dbname=postgres"
        ),
    )
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    ns = parser.parse_args()
    anyio.run(main, ns.dsn, ns.jobs, ns.batch, ns.runs)
