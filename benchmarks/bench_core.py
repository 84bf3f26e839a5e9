"""Core benchmarks for pgoutbox: idle wake-up latency and drain throughput.

Run from the repository root::

    python benchmarks/bench_core.py [--dsn DSN] [--runs 5] [--latency-jobs 300]
                                    [--drain-jobs 20000] [--backend asyncio|trio]
                                    [--concurrency 50]

``--dsn`` (default ``$PGOUTBOX_BENCH_DSN``, else a local ``postgres`` database)
is only an admin connection: the benchmark creates a throw-away database
``pgoutbox_bench_<hex>`` there, works only inside it, and drops it
``WITH (FORCE)`` at the end, also on error or Ctrl-C. Each run of each
scenario migrates a fresh schema, and drops it afterwards so that autovacuum of
an old run cannot disturb the next.

Scenarios, each repeated ``--runs`` times:

idle latency
    A worker runs in-process with a 30 s poll interval, so only LISTEN/NOTIFY
    can wake it in time. A producer on its own connection enqueues one job per
    committed transaction and waits until the handler has started before it
    enqueues the next. Two figures per job, from `time.perf_counter`:

    - ``commit→start``: from just after COMMIT returned to the producer to the
      first line of the handler (the headline figure);
    - ``enqueue→start``: from just before the enqueue statement (after BEGIN)
      to the first line of the handler; this adds the INSERT+NOTIFY and the
      COMMIT round trips.

    Measuring starts once `Worker.wait_listening` returned and a few warm-up
    jobs (not measured) ran.

drain throughput
    N no-op jobs are bulk-inserted (one ``INSERT ... SELECT generate_series``,
    then ``ANALYZE``) before a worker (default poll interval) starts; the clock
    runs from just before the worker starts (connect, schema check and
    registration included) until the handler has been called N times.
    ``first→last`` is the same count over the span from the first to the last
    handler call, without start-up; ``jobs per fetch`` is N over the worker's
    fetch count; ``Python CPU per job`` is this process's CPU time (the worker
    runs in it) over the same span as the throughput, divided by N: the
    worker's own cost per job, steadier than the wall clock on a shared
    machine. The worker then stops gracefully and every job must be
    ``completed``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import secrets
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from time import perf_counter, process_time
from typing import Any, Final

import anyio
import psycopg
from psycopg import sql

import pgoutbox

ADMIN_DSN_ENV: Final = "PGOUTBOX_BENCH_DSN"
DEFAULT_ADMIN_DSN: Final = "host=127.0.0.1 user=postgres dbname=postgres"
DATABASE_PREFIX: Final = "pgoutbox_bench_"
TASK_NAME: Final = "bench.noop"

IDLE_POLL_INTERVAL: Final = 30.0
"""The latency worker's poll interval: long, so that only NOTIFY wakes it in time."""

WARMUP_JOBS: Final = 5
"""Unmeasured jobs run before the latency measurement, once the worker listens."""

WARMUP_TIMEOUT: Final = 20.0
"""Seconds allowed for the worker to start, LISTEN and run the warm-up jobs."""

JOB_START_TIMEOUT: Final = 10.0
"""Seconds a measured job may take to start; well below IDLE_POLL_INTERVAL."""

STOP_TIMEOUT: Final = 30.0
"""Seconds a worker may take to return from `run` after `stop`."""

DROP_TIMEOUT: Final = 30.0
"""Seconds allowed to drop the throw-away database at the end."""

PERCENTILES: Final = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class Options:
    """The command-line options."""

    dsn: str
    runs: int
    latency_jobs: int
    drain_jobs: int
    backend: str
    concurrency: int


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """Per-job latencies of one idle-latency run, in milliseconds."""

    after_commit_ms: list[float]
    before_enqueue_ms: list[float]


@dataclass(frozen=True, slots=True)
class DrainResult:
    """One drain run."""

    jobs: int
    seconds: float
    first_to_last_seconds: float
    fetches: int
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the summary table: a figure measured once per run."""

    scenario: str
    unit: str
    values: list[float]


# -- helpers -----------------------------------------------------------------


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line into `Options`."""
    parser = argparse.ArgumentParser(
        description="pgoutbox core benchmarks: idle NOTIFY latency and drain throughput."
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get(ADMIN_DSN_ENV) or DEFAULT_ADMIN_DSN,
        help=f"admin connection string (default: ${ADMIN_DSN_ENV} or %(default)r); "
        "a throw-away database is created and dropped through it",
    )
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--latency-jobs", type=positive_int, default=300)
    parser.add_argument("--drain-jobs", type=positive_int, default=20000)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--concurrency", type=positive_int, default=50)
    ns = parser.parse_args(argv)
    return Options(
        dsn=ns.dsn,
        runs=ns.runs,
        latency_jobs=ns.latency_jobs,
        drain_jobs=ns.drain_jobs,
        backend=ns.backend,
        concurrency=ns.concurrency,
    )


def percentile(values: Sequence[float], pct: int) -> float:
    """The `pct`-th percentile of `values`, linearly interpolated."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def register_noop(
    queue: pgoutbox.Queue, on_start: Callable[[int], None]
) -> pgoutbox.Task[Any, Any]:
    """Register a no-op task on `queue` whose handler first calls ``on_start(i)``."""

    async def noop(i: int) -> None:
        on_start(i)

    return queue.task(name=TASK_NAME)(noop)


@asynccontextmanager
async def temporary_database(admin_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """Create a throw-away database; yield its DSN and the server version; drop it."""
    name = f"{DATABASE_PREFIX}{secrets.token_hex(6)}"
    async with await pgoutbox.connect(admin_dsn, autocommit=True) as admin:
        cur = await admin.execute("SHOW server_version")
        row = await cur.fetchone()
        server_version = str(row[0]) if row else "?"
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name), server_version
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(DROP_TIMEOUT):
                await admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


@asynccontextmanager
async def fresh_queue(dsn: str, schema: str) -> AsyncIterator[pgoutbox.Queue]:
    """A `Queue` on a newly migrated `schema`, dropped after a successful block.

    On error the schema is left to the database drop.
    """
    async with pgoutbox.Queue(dsn, schema=schema) as queue:
        await queue.migrate()
        yield queue
    async with await pgoutbox.connect(dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@asynccontextmanager
async def running(worker: pgoutbox.Worker) -> AsyncIterator[None]:
    """Run `worker` in the background for the block, then stop it and wait for `run`.

    Raises:
        RuntimeError: the worker did not return within `STOP_TIMEOUT` after `stop`.
    """
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            yield
        finally:
            worker.stop()
            tg.cancel_scope.deadline = anyio.current_time() + STOP_TIMEOUT
    if tg.cancel_scope.cancelled_caught:
        raise RuntimeError(f"worker did not return within {STOP_TIMEOUT:.0f} s of stop()")


async def job_states(dsn: str, schema: str) -> dict[str, int]:
    """How many jobs of `schema` are in each state."""
    query = sql.SQL("SELECT state::text, count(*) FROM {}.jobs GROUP BY 1").format(
        sql.Identifier(schema)
    )
    async with await pgoutbox.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query)
        return {str(state): int(n) for state, n in await cur.fetchall()}


def check_all_completed(schema: str, states: dict[str, int], expected: int) -> None:
    """Raise if not exactly `expected` jobs, all completed, are in `states`."""
    if states != {"completed": expected}:
        raise RuntimeError(f"{schema}: expected {expected} completed jobs, found {states}")


# -- scenarios ---------------------------------------------------------------


class StartSignals:
    """Per-job start events: the producer arms one, the handler records and sets it."""

    def __init__(self) -> None:
        self.started_at: dict[int, float] = {}
        self._events: dict[int, anyio.Event] = {}

    def arm(self, i: int) -> anyio.Event:
        """The event the handler of job `i` sets when it starts."""
        event = self._events[i] = anyio.Event()
        return event

    def on_start(self, i: int) -> None:
        """Called first thing in the handler."""
        self.started_at[i] = perf_counter()
        event = self._events.pop(i, None)
        if event is not None:
            event.set()


async def enqueue_and_wait(
    conn: pgoutbox.Connection[Any],
    queue: pgoutbox.Queue,
    task: pgoutbox.Task[Any, Any],
    signals: StartSignals,
    i: int,
    *,
    timeout: float,  # noqa: ASYNC109 (a bound on the wait, not a cancellation API)
) -> tuple[float, float]:
    """Enqueue job `i` in its own transaction and wait until its handler starts.

    Returns the times just before the enqueue statement and just after COMMIT.
    """
    started = signals.arm(i)
    async with conn.transaction():
        before_enqueue = perf_counter()
        await queue.enqueue(conn, task, i)
    after_commit = perf_counter()
    try:
        with anyio.fail_after(timeout):
            await started.wait()
    except TimeoutError:
        raise RuntimeError(f"job {i} did not start within {timeout:.0f} s") from None
    return before_enqueue, after_commit


async def measure_idle_latency(
    dsn: str, schema: str, *, jobs: int, concurrency: int
) -> LatencyResult:
    """Enqueue `jobs` jobs one at a time to an idle worker; return enqueue→start latencies."""
    after_commit: list[float] = []
    before_enqueue: list[float] = []
    async with fresh_queue(dsn, schema) as queue:
        signals = StartSignals()
        task = register_noop(queue, signals.on_start)
        worker = pgoutbox.Worker(queue, concurrency=concurrency, poll_interval=IDLE_POLL_INTERVAL)
        async with (
            await pgoutbox.connect(dsn, autocommit=True) as conn,
            running(worker),
        ):
            # NOTIFY must be what wakes the worker: wait for its LISTEN, then
            # run a few unmeasured jobs (connections, prepared statements).
            with anyio.fail_after(WARMUP_TIMEOUT):
                await worker.wait_listening()
                for w in range(1, WARMUP_JOBS + 1):
                    await enqueue_and_wait(conn, queue, task, signals, -w, timeout=WARMUP_TIMEOUT)
            for i in range(jobs):
                t_before, t_commit = await enqueue_and_wait(
                    conn, queue, task, signals, i, timeout=JOB_START_TIMEOUT
                )
                t_start = signals.started_at[i]
                after_commit.append((t_start - t_commit) * 1000)
                before_enqueue.append((t_start - t_before) * 1000)
        check_all_completed(schema, await job_states(dsn, schema), jobs + WARMUP_JOBS)
    return LatencyResult(after_commit_ms=after_commit, before_enqueue_ms=before_enqueue)


class Countdown:
    """Counts handler calls; `done` is set at the `total`-th."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.done = anyio.Event()
        self.first_at: float | None = None
        self.last_at: float | None = None

    def on_start(self, _i: int) -> None:
        """Called first thing in the handler."""
        now = perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.remaining -= 1
        if self.remaining == 0:
            self.last_at = now
            self.done.set()


async def preload_jobs(
    dsn: str, queue: pgoutbox.Queue, task: pgoutbox.Task[Any, Any], n: int
) -> None:
    """Insert `n` available jobs for `task` in one statement, then ANALYZE the table."""
    table = sql.Identifier(queue.schema, "jobs")
    insert = sql.SQL(
        "INSERT INTO {table} (queue, task, args, priority, state, max_attempts) "
        "SELECT %(queue)s, %(task)s, jsonb_build_object('i', g), %(priority)s, "
        "'available'::{state}, %(max_attempts)s "
        "FROM generate_series(1, %(n)s) AS g"
    ).format(table=table, state=sql.Identifier(queue.schema, "job_state"))
    params = {
        "queue": task.queue,
        "task": task.name,
        "priority": task.priority,
        "max_attempts": task.retry.max_attempts,
        "n": n,
    }
    async with await pgoutbox.connect(dsn, autocommit=True) as conn:
        await conn.execute(insert, params)
        await conn.execute(sql.SQL("ANALYZE {}").format(table))


def drain_timeout(jobs: int) -> float:
    """A generous bound on a drain of `jobs` jobs (at least 20 jobs/s)."""
    return max(120.0, jobs / 20)


async def measure_drain(dsn: str, schema: str, *, jobs: int, concurrency: int) -> DrainResult:
    """Pre-load `jobs` no-op jobs, start a worker and time until all have been called."""
    async with fresh_queue(dsn, schema) as queue:
        countdown = Countdown(jobs)
        task = register_noop(queue, countdown.on_start)
        await preload_jobs(dsn, queue, task, jobs)
        worker = pgoutbox.Worker(queue, concurrency=concurrency)
        timeout = drain_timeout(jobs)
        started = perf_counter()
        cpu_started = process_time()
        async with running(worker):
            try:
                with anyio.fail_after(timeout):
                    await countdown.done.wait()
            except TimeoutError:
                raise RuntimeError(
                    f"drain: {countdown.remaining} of {jobs} jobs not run after {timeout:.0f} s"
                ) from None
            cpu_seconds = process_time() - cpu_started
        fetches = worker.statistics().fetches
        check_all_completed(schema, await job_states(dsn, schema), jobs)
    assert countdown.first_at is not None  # noqa: S101 (done is set, so jobs ran)
    assert countdown.last_at is not None  # noqa: S101
    return DrainResult(
        jobs=jobs,
        seconds=countdown.last_at - started,
        first_to_last_seconds=countdown.last_at - countdown.first_at,
        fetches=fetches,
        cpu_seconds=cpu_seconds,
    )


# -- report ------------------------------------------------------------------


def source_revision() -> str:
    """The git revision of the pgoutbox source tree, or "?" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(pgoutbox.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"


def machine_facts(backend: str, server_version: str) -> str:
    """One line describing where the benchmark ran."""
    if backend == "trio":
        import trio  # noqa: PLC0415 (optional: only needed to name its version)

        backend = f"trio {trio.__version__}"
    return (
        f"machine: cpus={os.cpu_count()} python={platform.python_version()} "
        f"postgresql={server_version} psycopg={psycopg.__version__} ({psycopg.pq.__impl__}) "
        f"anyio={metadata.version('anyio')} "
        f"pgoutbox={pgoutbox.__version__} ({source_revision()}) backend={backend}"
    )


def latency_metrics(results: Sequence[LatencyResult]) -> list[Metric]:
    """Percentile rows for both latency figures, one value per run."""
    rows = []
    for label, attr in (
        ("commit→start", "after_commit_ms"),
        ("enqueue→start", "before_enqueue_ms"),
    ):
        for pct in PERCENTILES:
            values = [percentile(getattr(r, attr), pct) for r in results]
            rows.append(Metric(f"idle latency {label} p{pct}", "ms", values))
    return rows


def drain_metrics(results: Sequence[DrainResult]) -> list[Metric]:
    """Throughput rows, one value per run."""
    return [
        Metric("drain throughput", "jobs/s", [r.jobs / r.seconds for r in results]),
        Metric(
            "drain throughput first→last",
            "jobs/s",
            [r.jobs / r.first_to_last_seconds for r in results],
        ),
        Metric("drain jobs per fetch", "jobs", [r.jobs / r.fetches for r in results]),
        Metric("drain Python CPU per job", "µs", [r.cpu_seconds / r.jobs * 1e6 for r in results]),
    ]


def format_value(value: float) -> str:
    """A figure with about three significant digits."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(metrics: Sequence[Metric]) -> str:
    """The summary table: scenario, median, min-max, unit."""
    header = ("scenario", "median", "min-max", "unit")
    rows = [
        (
            m.scenario,
            format_value(statistics.median(m.values)),
            f"{format_value(min(m.values))}-{format_value(max(m.values))}",
            m.unit,
        )
        for m in metrics
    ]
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(width) if col in (0, 3) else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- main --------------------------------------------------------------------


async def run_benchmark(opts: Options) -> None:
    """Run every scenario `opts.runs` times in a throw-away database and print the table."""
    async with temporary_database(opts.dsn) as (dsn, server_version):
        print(machine_facts(opts.backend, server_version))
        print(
            f"settings: runs={opts.runs} latency_jobs={opts.latency_jobs} "
            f"drain_jobs={opts.drain_jobs} concurrency={opts.concurrency} "
            f"latency_poll_interval={IDLE_POLL_INTERVAL:.0f}s",
            flush=True,
        )
        latencies: list[LatencyResult] = []
        drains: list[DrainResult] = []
        for run in range(1, opts.runs + 1):
            latency = await measure_idle_latency(
                dsn,
                f"bench_latency_{run}",
                jobs=opts.latency_jobs,
                concurrency=opts.concurrency,
            )
            drain = await measure_drain(
                dsn, f"bench_drain_{run}", jobs=opts.drain_jobs, concurrency=opts.concurrency
            )
            latencies.append(latency)
            drains.append(drain)
            print(
                f"run {run}/{opts.runs}: commit→start p50 "
                f"{percentile(latency.after_commit_ms, 50):.2f} ms, "
                f"p99 {percentile(latency.after_commit_ms, 99):.2f} ms; "
                f"drain {drain.jobs / drain.seconds:,.0f} jobs/s "
                f"({drain.seconds:.2f} s, {drain.fetches} fetches)",
                flush=True,
            )
    print()
    print(format_table([*latency_metrics(latencies), *drain_metrics(drains)]))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    interrupted = False
    try:
        anyio.run(run_benchmark, opts, backend=opts.backend)
    except* KeyboardInterrupt:  # bare on asyncio, inside a task group's group on trio
        interrupted = True
    if interrupted:
        print("interrupted (the benchmark database was dropped)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
