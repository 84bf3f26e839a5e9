"""What a durable claim costs the database: fetch loops with no handlers behind them.

Run: ``python benchmarks/bench_claim.py [--dsn DSN] [--jobs 50000] [--batch 100] [--runs 5]
[--running N]``.

Each loop drains `jobs` pre-loaded rows on one autocommit connection, one
statement per batch of `batch` rows, and calls nothing per row:

``delete``
    The yardstick's statement: ``DELETE ... WHERE id IN (SELECT ... FOR UPDATE
    SKIP LOCKED) RETURNING`` on a two-column table. One write per job, and a
    job whose worker dies is lost (at-most-once). Every ratio is to this loop.
``delete, array``
    The same delete, with the locked ids passed as ``id = ANY(ARRAY(SELECT
    ...))``: PostgreSQL then looks each row up by key instead of joining a
    hashed sub-select, which is cheaper. Every claiming loop below uses this
    form, so this loop is the one to compare them with for the cost of the
    claim itself.
``claim+delete``
    The least an at-least-once queue writes: each statement marks the next
    batch ``running`` under a worker (a new row version, with an entry in a
    partial index of running rows, so that a dead worker's jobs can be found)
    and deletes the batch before it. Two writes per job, both durable.
``claim+delete, ordered``
    The same, with jobs taken in pgoutbox's order, by queue, priority and due
    time (three more columns, and the partial index of waiting jobs on them
    instead of on the id alone).
``claim+delete, jobs``
    The same single statement on pgoutbox's own ``jobs`` table (its columns
    and indexes), fenced by claim, returning what a worker needs to run a
    job. What pgoutbox's table costs, without its fetch function.
``pgoutbox``
    pgoutbox's own fetch statement on its real schema: it claims the next
    batch for a registered worker and deletes the previous one, fenced by
    attempt and claim, exactly as a worker with ``completed_retention=0``
    sends it, only without running jobs in between.
``hot-claim+delete``
    The cheapest durable claim: like ``claim+delete``, but the claim changes no
    indexed column (the fetch scans the primary key and skips rows that have
    a worker; nothing indexes a state), so PostgreSQL writes the new row
    version on the same page, a HOT update, with no index entry (the table
    has ``fillfactor = 50`` to leave it room). The price is that every fetch
    reads past every claimed job that is still running: see ``--running``.
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

The last two columns are the write-ahead log each loop writes per job (WAL
records and bytes, medians), from the server's ``pg_stat_wal``: every row a
statement locks, writes or deletes, and every index entry it adds, is a
record, so they show what a loop does per job whatever the machine's speed.

With ``--running N``, the first N of ``jobs + N`` rows are taken before the
clock starts, in each loop's own way, and stay taken while the loop drains the
other ``jobs`` rows: deleted by the deleting loops, claimed by another worker
for the claiming loops, locked by a second connection's open transaction for
``lock+delete``. This is a queue with N long-running jobs: a loop whose fetch
must read past them pays for it at every statement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import anyio
from _scratch import add_dsn_option, throwaway_database
from psycopg import sql

import pgoutbox
from pgoutbox import _store
from pgoutbox._job import JobState, Outcome
from pgoutbox._sql import Statements

TASK: Final = "bench.noop"

Params = Sequence[object] | Mapping[str, object]
"""Parameters of a loop's statement."""
ParamsOf = Callable[[list[int], str, int], Params]
"""A loop's statement parameters from (the previous batch's ids, the claimer, the limit)."""


def _limit_only(_done: list[int], _worker: str, limit: int) -> Params:
    return [limit]


def _claim_params(done: list[int], worker: str, limit: int) -> Params:
    return {"done": done, "worker": worker, "limit": limit}


class StatementLoop:
    """A loop that drains one table with one statement per batch."""

    def __init__(self, table: str, create: str, statement: str, params: ParamsOf) -> None:
        self.table = table
        self.create = create
        self.statement = statement
        self.params = params


STATEMENT_LOOPS: Final = {
    "delete": StatementLoop(
        "q1",
        "CREATE TABLE q1 (id bigserial PRIMARY KEY, payload jsonb NOT NULL)",
        "DELETE FROM q1 WHERE id IN ("
        "SELECT id FROM q1 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) "
        "RETURNING id, (payload->>'i')::int8",
        _limit_only,
    ),
    "delete, array": StatementLoop(
        "q5",
        "CREATE TABLE q5 (id bigserial PRIMARY KEY, payload jsonb NOT NULL)",
        "DELETE FROM q5 WHERE id = ANY(ARRAY("
        "SELECT id FROM q5 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)) "
        "RETURNING id, (payload->>'i')::int8",
        _limit_only,
    ),
    "claim+delete": StatementLoop(
        "q2",
        "CREATE TABLE q2 (id bigserial PRIMARY KEY, payload jsonb NOT NULL, "
        "state text NOT NULL DEFAULT 'available', worker text, attempt int NOT NULL DEFAULT 0, "
        "claimed_at timestamptz) WITH (fillfactor = 80);"
        "CREATE INDEX q2_fetch ON q2 (id) WHERE state = 'available';"
        "CREATE INDEX q2_running ON q2 (worker) WHERE state = 'running'",
        "WITH done AS (DELETE FROM q2 WHERE id = ANY(%(done)s) AND worker = %(worker)s), "
        "claimed AS (UPDATE q2 SET state = 'running', worker = %(worker)s, "
        "attempt = attempt + 1, claimed_at = now() "
        "WHERE id = ANY(ARRAY(SELECT id FROM q2 WHERE state = 'available' "
        "ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)) "
        "RETURNING id, (payload->>'i')::int8) "
        "SELECT * FROM claimed",
        _claim_params,
    ),
    "claim+delete, ordered": StatementLoop(
        "q6",
        "CREATE TABLE q6 (id bigserial PRIMARY KEY, payload jsonb NOT NULL, "
        "queue text NOT NULL DEFAULT 'default', priority smallint NOT NULL DEFAULT 0, "
        "run_at timestamptz NOT NULL DEFAULT now(), "
        "state text NOT NULL DEFAULT 'available', worker text, attempt int NOT NULL DEFAULT 0, "
        "claimed_at timestamptz) WITH (fillfactor = 80);"
        "CREATE INDEX q6_fetch ON q6 (queue, priority DESC, run_at, id) "
        "WHERE state = 'available';"
        "CREATE INDEX q6_running ON q6 (worker) WHERE state = 'running'",
        "WITH done AS (DELETE FROM q6 WHERE id = ANY(%(done)s) AND worker = %(worker)s), "
        "claimed AS (UPDATE q6 SET state = 'running', worker = %(worker)s, "
        "attempt = attempt + 1, claimed_at = now() "
        "WHERE id = ANY(ARRAY(SELECT id FROM q6 "
        "WHERE queue = 'default' AND state = 'available' AND run_at <= now() "
        "ORDER BY priority DESC, run_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)) "
        "RETURNING id, (payload->>'i')::int8) "
        "SELECT * FROM claimed",
        _claim_params,
    ),
    "hot-claim+delete": StatementLoop(
        "q4",
        "CREATE TABLE q4 (id bigserial PRIMARY KEY, payload jsonb NOT NULL, worker text, "
        "attempt int NOT NULL DEFAULT 0, claimed_at timestamptz) WITH (fillfactor = 50)",
        "WITH done AS (DELETE FROM q4 WHERE id = ANY(%(done)s) AND worker = %(worker)s), "
        "claimed AS (UPDATE q4 SET worker = %(worker)s, attempt = attempt + 1, "
        "claimed_at = now() WHERE id = ANY(ARRAY(SELECT id FROM q4 WHERE worker IS NULL "
        "ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)) "
        "RETURNING id, (payload->>'i')::int8) "
        "SELECT * FROM claimed",
        _claim_params,
    ),
}
"""The loops that differ only in their table and statement."""

LOCK_TABLE: Final = STATEMENT_LOOPS["claim+delete"].create.replace("q2", "q3")
LOCK_FETCH: Final = (
    "SELECT id, (payload->>'i')::int8 FROM q3 WHERE state = 'available' "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
LOCK_DONE: Final = "DELETE FROM q3 WHERE id = ANY(%s)"
LOCK_BATCHES_PER_COMMIT: Final = 4

JOBS_CLAIM: Final = (
    "WITH done AS ("
    "DELETE FROM {jobs} AS j WHERE j.id = ANY(%(done)s::bigint[]) "
    "AND j.state::text = 'running' AND j.claim_id = %(previous)s::uuid), "
    "claimed AS ("
    "UPDATE {jobs} AS j SET state = 'running', attempt = j.attempt + 1, attempted_at = now(), "
    "worker_id = %(worker)s::uuid, claim_id = %(claim)s::uuid "
    "WHERE j.id = ANY(ARRAY("
    "SELECT i.id FROM {jobs} AS i "
    "WHERE i.queue = 'default' AND i.state = 'available' AND i.run_at <= now() "
    "ORDER BY i.priority DESC, i.run_at, i.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)) "
    "RETURNING j.id, j.queue, j.task, j.args::text, j.priority, j.attempt, j.max_attempts, "
    "j.created_at, j.headers::text) "
    "SELECT * FROM claimed"
)
"""The ``claim+delete, jobs`` loop's statement. The completed rows' state is compared
as text, as pgoutbox's function does: compared as its enum, the planner may find them
by walking the whole index of running jobs (see docs/benchmarks.md)."""

LOOPS: Final = (
    "delete",
    "delete, array",
    "claim+delete",
    "claim+delete, ordered",
    "claim+delete, jobs",
    "pgoutbox",
    "hot-claim+delete",
    "lock+delete",
)


class Drained(NamedTuple):
    """What one loop's drain cost: its rate, and the WAL it wrote per job."""

    rate: float
    wal_records: float
    wal_bytes: float


class Meter:
    """Times a drain on `conn`, and counts the write-ahead log it writes.

    The WAL counts are the server's (``pg_stat_wal``, PostgreSQL 14 and newer),
    read after ``pg_stat_force_next_flush()`` (15 and newer) has made the
    connection's own counts current: anything else the server writes meanwhile
    (autovacuum, say) is counted too, which the median of several runs smooths.
    """

    def __init__(self, conn: pgoutbox.Connection[Any]) -> None:
        self._conn = conn
        self._started = 0.0
        self._wal = (0, 0)

    async def _read_wal(self) -> tuple[int, int]:
        await self._conn.execute("SELECT pg_stat_force_next_flush()")
        cur = await self._conn.execute("SELECT wal_records, wal_bytes::int8 FROM pg_stat_wal")
        row = await cur.fetchone()
        if row is None:
            raise RuntimeError("pg_stat_wal returned no row")
        return int(row[0]), int(row[1])

    async def start(self) -> None:
        """Mark the drain's start: read the WAL counts, then start the clock."""
        self._wal = await self._read_wal()
        self._started = time.perf_counter()

    async def stop(self, done: int, jobs: int) -> Drained:
        """The drain of `jobs` rows is over, with `done` rows taken."""
        elapsed = time.perf_counter() - self._started
        if done != jobs:
            raise RuntimeError(f"drained {done} of {jobs} rows")
        records, size = await self._read_wal()
        return Drained(
            jobs / elapsed, (records - self._wal[0]) / jobs, (size - self._wal[1]) / jobs
        )


async def _preload(conn: pgoutbox.Connection[Any], table: str, jobs: int) -> None:
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (payload) "
            "SELECT jsonb_build_object('i', g) FROM generate_series(1, %s) g"
        ).format(sql.Identifier(table)),
        [jobs],
    )
    await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))


async def _statement_loop(
    conn: pgoutbox.Connection[Any], loop: StatementLoop, jobs: int, batch: int, running: int
) -> Drained:
    await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(loop.table)))
    await conn.execute(loop.create)
    await _preload(conn, loop.table, jobs + running)
    if running:
        # Another worker's jobs, taken at the head of the queue and never finished.
        await conn.execute(loop.statement, loop.params([], "w0", running))
    meter, done = Meter(conn), 0
    await meter.start()
    previous: list[int] = []
    while True:
        cur = await conn.execute(loop.statement, loop.params(previous, "w1", batch))
        previous = [row[0] for row in await cur.fetchall()]
        done += len(previous)
        if not previous:
            break
    return await meter.stop(done, jobs)


async def _lock_delete_loop(
    dsn: str, conn: pgoutbox.Connection[Any], jobs: int, batch: int, running: int
) -> Drained:
    await conn.execute("DROP TABLE IF EXISTS q3")
    await conn.execute(LOCK_TABLE)
    await _preload(conn, "q3", jobs + running)
    # Another worker's running jobs are rows locked by its open transaction.
    async with await pgoutbox.connect(dsn) as other:
        if running:
            await other.execute(LOCK_FETCH, [running])
        meter, done, batches = Meter(conn), 0, 0
        await meter.start()
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
        return await meter.stop(done, jobs)


async def _jobs_loop(
    dsn: str,
    conn: pgoutbox.Connection[Any],
    *,
    own_statement: bool,
    jobs: int,
    batch: int,
    run: int,
    running: int,
) -> Drained:
    """Drain pgoutbox's schema: with its fetch statement, or with ``JOBS_CLAIM``."""
    schema = f"claim_bench_{run}"
    queue = pgoutbox.Queue(dsn, schema=schema)
    async with queue:
        await queue.migrate()
    st = queue.statements
    worker_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    for wid, concurrency in ((worker_id, 2 * batch), (other_id, max(running, 1))):
        await _store.worker_register(
            conn,
            st,
            worker_id=wid,
            hostname="bench",
            pid=os.getpid(),
            queues=["default"],
            tasks=[TASK],
            concurrency=concurrency,
            heartbeat_timeout=3600.0,
        )
    table = sql.Identifier(schema, "jobs")
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (queue, task, args, priority, state, max_attempts) "
            "SELECT 'default', %s, jsonb_build_object('i', g), 0, 'available', 20 "
            "FROM generate_series(1, %s) g"
        ).format(table),
        [TASK, jobs + running],
    )
    await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
    if running:
        await _store.job_claim(
            conn,
            st,
            queues=["default"],
            tasks=[TASK],
            limit=running,
            worker_id=other_id,
            claim_id=str(uuid.uuid4()),
        )
    if own_statement:
        rate = await _drain_with_fetch(conn, queue.statements, worker_id, jobs, batch)
    else:
        rate = await _drain_with_claim(
            conn, sql.SQL(JOBS_CLAIM).format(jobs=table), worker_id, jobs, batch
        )
    await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return rate


class FetchLoop:
    """pgoutbox's fetch statement sent over and over, as a worker with
    ``completed_retention=0`` sends it: each fetch completes the jobs of the
    previous one (whose handlers are taken to have run at once) and claims more."""

    def __init__(self, conn: pgoutbox.Connection[Any], st: Statements, worker_id: str) -> None:
        self._conn = conn
        self._st = st
        self._worker_id = worker_id
        self._previous: list[Outcome] = []

    async def fetch(self, limit: int) -> int:
        """One fetch of up to `limit` jobs of the "default" queue; returns how many it claimed."""
        claimed, _, _ = await _store.job_claim(
            self._conn,
            self._st,
            queues=["default"],
            tasks=[TASK],
            limit=limit,
            worker_id=self._worker_id,
            claim_id=str(uuid.uuid4()),
            completed=self._previous,
            keep_completed=False,
        )
        self._previous = [
            Outcome(job.id, job.attempt, JobState.COMPLETED, claim_id=job.claim_id)
            for job in claimed
        ]
        return len(claimed)


async def _drain_with_fetch(
    conn: pgoutbox.Connection[Any], st: Statements, worker_id: str, jobs: int, batch: int
) -> Drained:
    loop, meter, done = FetchLoop(conn, st, worker_id), Meter(conn), 0
    await meter.start()
    while took := await loop.fetch(batch):
        done += took
    return await meter.stop(done, jobs)


async def _drain_with_claim(
    conn: pgoutbox.Connection[Any], statement: sql.Composed, worker_id: str, jobs: int, batch: int
) -> Drained:
    meter, done = Meter(conn), 0
    await meter.start()
    previous: list[int] = []
    previous_claim: str | None = None
    while True:
        claim_id = str(uuid.uuid4())
        cur = await conn.execute(
            statement,
            {
                "done": previous,
                "previous": previous_claim,
                "worker": worker_id,
                "claim": claim_id,
                "limit": batch,
            },
        )
        previous, previous_claim = [row[0] for row in await cur.fetchall()], claim_id
        done += len(previous)
        if not previous:
            break
    return await meter.stop(done, jobs)


async def _one(
    loop: str,
    dsn: str,
    conn: pgoutbox.Connection[Any],
    *,
    jobs: int,
    batch: int,
    run: int,
    running: int,
) -> Drained:
    if loop in STATEMENT_LOOPS:
        return await _statement_loop(conn, STATEMENT_LOOPS[loop], jobs, batch, running)
    if loop == "lock+delete":
        return await _lock_delete_loop(dsn, conn, jobs, batch, running)
    return await _jobs_loop(
        dsn,
        conn,
        own_statement=loop == "pgoutbox",
        jobs=jobs,
        batch=batch,
        run=run,
        running=running,
    )


async def main(dsn: str, jobs: int, batch: int, runs: int, running: int) -> None:
    results: dict[str, list[Drained]] = {loop: [] for loop in LOOPS}
    async with (
        throwaway_database(dsn, "pgoutbox_claim_") as db,
        await pgoutbox.connect(db, autocommit=True) as conn,
    ):
        for run in range(runs):
            for loop in LOOPS:
                results[loop].append(
                    await _one(loop, db, conn, jobs=jobs, batch=batch, run=run, running=running)
                )
    print(report(results, jobs, batch, runs, running))


def report(
    results: Mapping[str, Sequence[Drained]], jobs: int, batch: int, runs: int, running: int = 0
) -> str:
    """The table: jobs/s (median, min-max), µs per job, the ratio to ``delete``, and
    the WAL records and bytes written per job (medians)."""
    base = statistics.median(r.rate for r in results["delete"])
    lines = [
        (
            f"{jobs:,} rows, {batch} per statement, {runs} runs (median, min-max), "
            f"no handlers, {running:,} jobs of another worker running"
        ),
        (
            f"{'loop':22} {'jobs/s':>10} {'min-max':>17} {'µs/job':>7} {'÷ delete':>9} "
            f"{'WAL rec/job':>12} {'WAL B/job':>10}"
        ),
    ]
    for loop, drains in results.items():
        rates = [d.rate for d in drains]
        median = statistics.median(rates)
        records = statistics.median(d.wal_records for d in drains)
        size = statistics.median(d.wal_bytes for d in drains)
        lines.append(
            f"{loop:22} {median:>10,.0f} {min(rates):>8,.0f}-{max(rates):<8,.0f} "
            f"{1e6 / median:>7.1f} {median / base:>9.2f} {records:>12.2f} {size:>10,.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_dsn_option(parser)
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--running",
        type=int,
        default=0,
        help="jobs taken at the head of the queue before each loop, kept running during it",
    )
    ns = parser.parse_args()
    anyio.run(main, ns.dsn, ns.jobs, ns.batch, ns.runs, ns.running)
