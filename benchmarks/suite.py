"""Comparative benchmark suite: pgoutbox against its peers and a hand-written yardstick.

Run from the repository root (the peers are optional; missing ones are skipped)::

    python benchmarks/suite.py [--quick] [--runs N]
        [--systems pgoutbox,yardstick,pgqueuer-asyncpg,pgqueuer-psycopg,procrastinate]
        [--scenarios single,notify,bulk,drain,idle,load,backlog]
        [--dsn DSN] [--write-results] [--json PATH] [--peers-from PATH]
        [--load-rate JOBS_PER_S] [--py-spy DIR]

``--dsn`` (default ``$PGOUTBOX_BENCH_DSN``, else a local ``postgres`` database)
is only an admin connection: every measurement runs in a database of its own,
``CREATE DATABASE bench_<hex>``, dropped ``WITH (FORCE)`` right after, also on
error or Ctrl-C. Within a run the systems take turns, so slow drifts of the
machine spread over all of them. Each figure is the median of ``--runs`` runs
(3 by default, 1 with ``--quick``; the big backlog runs once) with the min-max.

Scenarios (sizes of the full suite; ``--quick`` shrinks them):

single
    Jobs/s enqueued one per transaction (an autocommit statement, which is
    each system's one-job enqueue), from 1 producer and from 16 concurrent
    producers, each on a connection of its own, all in this process.
notify
    1 producer and 16 concurrent producers, with and without the NOTIFY each
    enqueue sends (NOTIFY takes a cluster-wide lock at commit). pgoutbox and the yardstick
    skip it on the producer side (pgoutbox: ``Queue(notify=False)``, or on
    older trees a 1 µs delay, which takes its insert path without
    ``pg_notify``); pgqueuer and procrastinate, which NOTIFY from a trigger,
    have the trigger disabled.
bulk
    100k jobs enqueued in batches of 1,000, one transaction per batch, with
    each system's bulk API.
drain
    50k pre-loaded no-op jobs, then 1 or 2 worker processes (real
    subprocesses): jobs/s from telling the processes to start until the
    database has no unfinished job. Slow systems are cut off after a time cap
    and marked ``*`` (jobs run / time).
idle
    enqueue→handler start latency (commit returned → first line of the
    handler) over 300 jobs, one committed transaction each, into an idle
    worker process; 10 ms pause between jobs; cut off after 60 s (a system
    that only polls would otherwise take minutes).
load
    The same latency while 4 producers enqueue at a fixed rate for 10 s: half
    of pgoutbox's 1-process drain capacity (from ``drain`` in this run, else
    calibrated), the same rate for every system; a system whose own capacity
    is lower gets half of its own (marked). Commits are fsync-bound, so above
    200 transactions/s each transaction carries several jobs (the system's
    bulk enqueue), and a job's latency counts from its transaction's commit.
backlog
    1-process drain throughput over the first 20k jobs (or 20 s) with 1M jobs
    waiting, against the same with 50k waiting.

The ratio column is pgoutbox ÷ system: for throughput above 1 means pgoutbox
is faster, for latency below 1 means pgoutbox is faster.

``--py-spy DIR`` runs every worker process under ``py-spy record`` and keeps
its raw (collapsed) stacks in DIR, e.g. for
``python benchmarks/suite.py --systems pgoutbox --scenarios drain --runs 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from itertools import count
from pathlib import Path
from time import perf_counter
from typing import Any, Final

import anyio
import anyio.abc
import psycopg
from anyio.abc import SocketAttribute
from psycopg import sql
from systems import NAMES, Counters, ProbeSpec, StartTimes, System, decode_report, load

ADMIN_DSN_ENV: Final = "PGOUTBOX_BENCH_DSN"
DEFAULT_ADMIN_DSN: Final = "host=127.0.0.1 user=postgres dbname=postgres"
DATABASE_PREFIX: Final = "bench_"
SCENARIOS: Final = ("single", "notify", "bulk", "drain", "idle", "load", "backlog")
RESULTS_PATH: Final = Path(__file__).resolve().parent / "results.md"
JSON_PATH: Final = Path(__file__).resolve().parent / "results.json"

DROP_TIMEOUT: Final = 60.0
WARMUP_JOBS: Final = 5
JOB_START_TIMEOUT: Final = 15.0
IDLE_GAP: Final = 0.010
"""Seconds between idle-latency jobs, so the worker is idle (its ack written) each time."""
LOAD_FRACTION: Final = 0.5
LOAD_PRODUCERS: Final = 4
LOAD_MAX_TRANSACTIONS: Final = 200
"""Transactions/s the load producers write at most; above, each carries several jobs."""
PERCENTILES: Final = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class Sizes:
    """The sizes of one suite flavour (full or quick)."""

    runs: int
    single_one: int
    single_many_each: int
    producers: int
    bulk_jobs: int
    bulk_batch: int
    drain_jobs: int
    drain_cap: float
    idle_jobs: int
    idle_cap: float
    load_seconds: float
    calibrate_jobs: int
    backlog_small: int
    backlog_big: int
    backlog_window: int
    backlog_cap: float
    backlog_runs: int


FULL: Final = Sizes(
    runs=3,
    single_one=3000,
    single_many_each=400,
    producers=16,
    bulk_jobs=100_000,
    bulk_batch=1000,
    drain_jobs=50_000,
    drain_cap=30.0,
    idle_jobs=300,
    idle_cap=60.0,
    load_seconds=10.0,
    calibrate_jobs=20_000,
    backlog_small=50_000,
    backlog_big=1_000_000,
    backlog_window=20_000,
    backlog_cap=20.0,
    backlog_runs=1,
)

QUICK: Final = Sizes(
    runs=1,
    single_one=300,
    single_many_each=50,
    producers=16,
    bulk_jobs=10_000,
    bulk_batch=1000,
    drain_jobs=10_000,
    drain_cap=10.0,
    idle_jobs=100,
    idle_cap=20.0,
    load_seconds=3.0,
    calibrate_jobs=5_000,
    backlog_small=10_000,
    backlog_big=100_000,
    backlog_window=5_000,
    backlog_cap=6.0,
    backlog_runs=1,
)


@dataclass(frozen=True, slots=True)
class Options:
    """The command line."""

    dsn: str
    quick: bool
    sizes: Sizes
    systems: tuple[str, ...]
    scenarios: tuple[str, ...]
    write_results: bool
    json_path: str | None
    peers_from: str | None
    load_rate: float | None
    log_dir: str
    profile_dir: str | None


# -- results -------------------------------------------------------------------


@dataclass(slots=True)
class Metric:
    """One row group of a scenario's table: a figure per system per run."""

    scenario: str
    label: str
    unit: str
    higher_is_better: bool | None
    """None: informational, no ratio."""
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, set[str]] = field(default_factory=dict)


class Results:
    """Every figure measured, in the order first reported."""

    def __init__(self) -> None:
        self.metrics: dict[tuple[str, str], Metric] = {}
        self.footnotes: dict[str, str] = {}
        self.errors: list[str] = []
        self.loads: list[float] = []
        """The 1-minute load average at the start of each measurement."""
        self.capacities: dict[str, float] = {}
        """1-process drain capacities calibrated for the load scenario."""

    def add(
        self,
        scenario: str,
        label: str,
        unit: str,
        system: str,
        value: float,
        *,
        higher_is_better: bool | None,
        note: str | None = None,
        also: str | None = None,
    ) -> None:
        metric = self.metrics.setdefault(
            (scenario, label), Metric(scenario, label, unit, higher_is_better)
        )
        metric.values.setdefault(system, []).append(value)
        for n in (note, also):
            if n:
                metric.notes.setdefault(system, set()).add(n)

    def to_json(self) -> dict[str, Any]:
        """The raw figures, for `--json` and a later `--peers-from`."""
        return {
            "metrics": [
                {
                    "scenario": m.scenario,
                    "label": m.label,
                    "unit": m.unit,
                    "higher_is_better": m.higher_is_better,
                    "values": m.values,
                    "notes": {k: sorted(v) for k, v in m.notes.items()},
                }
                for m in self.metrics.values()
            ],
            "footnotes": self.footnotes,
            "errors": self.errors,
            "loads": self.loads,
        }

    def merge_peers(self, data: dict[str, Any], measured: Sequence[str]) -> set[str]:
        """Add the figures of systems not `measured` now from a saved run; return them."""
        merged: set[str] = set()
        for m in data["metrics"]:
            for system, values in m["values"].items():
                if system in measured:
                    continue
                metric = self.metrics.setdefault(
                    (m["scenario"], m["label"]),
                    Metric(m["scenario"], m["label"], m["unit"], m["higher_is_better"]),
                )
                metric.values[system] = [float(v) for v in values]
                metric.notes[system] = set(m["notes"].get(system, ()))
                merged.add(system)
        for key, text in data["footnotes"].items():
            self.footnotes.setdefault(key, text)
        return merged

    def median(self, scenario: str, label: str, system: str) -> float | None:
        metric = self.metrics.get((scenario, label))
        if metric is None or not metric.values.get(system):
            return None
        return statistics.median(metric.values[system])


# -- databases -------------------------------------------------------------------


_created: set[str] = set()
"""Databases created and not yet dropped (the last-resort sweep drops them)."""


@asynccontextmanager
async def fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    """Create ``bench_<hex>``; yield its DSN; drop it WITH (FORCE), also on error or cancel."""
    name = f"{DATABASE_PREFIX}{secrets.token_hex(6)}"
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        _created.add(name)
        try:
            yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(DROP_TIMEOUT):
                await admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
                _created.discard(name)


def sweep_databases(admin_dsn: str) -> None:
    """Drop any database this process created and did not drop (synchronous, last resort)."""
    if not _created:
        return
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as admin:
            for name in sorted(_created):
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
                _created.discard(name)
    except psycopg.Error as ex:
        print(f"could not drop {sorted(_created)}: {ex}", file=sys.stderr)


async def settle(dsn: str) -> None:
    """VACUUM ANALYZE the fresh database and CHECKPOINT, so every system starts alike."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute("CHECKPOINT")


@asynccontextmanager
async def system_in_fresh_database(
    opts: Options, name: str, *, notify: bool = True
) -> AsyncIterator[System]:
    """A system set up in a database of its own, torn down and dropped afterwards."""
    system = load(name)
    async with fresh_database(opts.dsn) as dsn:
        await system.setup(dsn, notify=notify)
        try:
            yield system
        finally:
            with anyio.CancelScope(shield=True):
                await system.teardown()


# -- helpers -------------------------------------------------------------------


def percentile(values: Sequence[float], pct: int) -> float:
    """The `pct`-th percentile of `values`, linearly interpolated."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


class Reports:
    """Handler start times from worker processes: a shared file, plus UDP wake-ups."""

    def __init__(self, sock: anyio.abc.UDPSocket, times: StartTimes) -> None:
        self.sock = sock
        self.times = times
        self.port: int = sock.extra(SocketAttribute.local_port)  # noqa: S610 (anyio, not Django)
        self._waiting: dict[int, anyio.Event] = {}

    async def receive_forever(self) -> None:
        async for data, _addr in self.sock:
            i, _t = decode_report(data)
            event = self._waiting.pop(i, None)
            if event is not None:
                event.set()

    async def wait_for(self, i: int, timeout: float) -> float:  # noqa: ASYNC109
        """The start time of job `i`, waiting up to `timeout` seconds for it."""
        with anyio.move_on_after(timeout):
            while (started := self.times.get(i)) is None:
                event = self._waiting.setdefault(i, anyio.Event())
                # A lost datagram only delays us until the next look at the file.
                with anyio.move_on_after(0.02):
                    await event.wait()
            return started
        raise RuntimeError(f"job {i} did not start within {timeout:.0f} s")


@asynccontextmanager
async def reports(opts: Options, jobs: int) -> AsyncIterator[Reports]:
    """Start times of up to `jobs` jobs, with UDP wake-ups read in the background."""
    times = StartTimes(opts.log_dir, jobs)
    try:
        async with (
            await anyio.create_udp_socket(local_host="127.0.0.1", local_port=0) as sock,
            anyio.create_task_group() as tg,
        ):
            rep = Reports(sock, times)
            tg.start_soon(rep.receive_forever)
            yield rep
            tg.cancel_scope.cancel()
    finally:
        times.close()


async def wait_count(
    counters: Counters,
    group_check: Callable[[], None],
    target: int,
    *,
    cap: float,
    started: float,
) -> tuple[int, float, bool]:
    """Wait until `target` handler calls or `cap` seconds after `started`.

    Returns the count, the time it was read, and whether the cap cut it short.
    """
    checks = count()
    while True:
        n = counters.total()
        now = perf_counter()
        if n >= target:
            return n, now, False
        if now - started >= cap:
            return n, now, True
        if next(checks) % 100 == 0:
            group_check()
        await anyio.sleep(0.002)


# -- scenarios -----------------------------------------------------------------


async def enqueue_rate(system: System, producers: int, per_producer: int) -> float:
    """Jobs/s enqueued one per transaction by `producers` concurrent producers."""
    async with AsyncExitStack() as stack:
        prods = [await stack.enter_async_context(system.producer()) for _ in range(producers)]
        for k, prod in enumerate(prods):  # warm-up: connections, prepared statements
            await prod.enqueue_one(-1 - k)

        async def produce(k: int) -> None:
            prod = prods[k]
            base = k * per_producer
            for i in range(base, base + per_producer):
                await prod.enqueue_one(i)

        started = perf_counter()
        async with anyio.create_task_group() as tg:
            for k in range(producers):
                tg.start_soon(produce, k)
        elapsed = perf_counter() - started
    return producers * per_producer / elapsed


async def scenario_single(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    for producers, each in ((1, s.single_one), (s.producers, s.single_many_each)):
        async with system_in_fresh_database(opts, name) as system:
            rate = await enqueue_rate(system, producers, each)
        label = f"{producers} producer{'s' if producers > 1 else ''}"
        results.add("single", label, "jobs/s", name, rate, higher_is_better=True)
        log(f"  single {name} {label}: {rate:,.0f} jobs/s")


async def scenario_notify(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    for producers, each in ((1, s.single_one), (s.producers, s.single_many_each)):
        who = f"{producers} producer{'s' if producers > 1 else ''}"
        rates = {}
        for notify in (True, False):
            async with system_in_fresh_database(opts, name, notify=notify) as system:
                rates[notify] = await enqueue_rate(system, producers, each)
            label = f"{who}, {'with' if notify else 'without'} NOTIFY"
            results.add("notify", label, "jobs/s", name, rates[notify], higher_is_better=True)
            log(f"  notify {name} {label}: {rates[notify]:,.0f} jobs/s")
        results.add(
            "notify",
            f"{who}: with ÷ without NOTIFY",
            "x",
            name,
            rates[True] / rates[False],
            higher_is_better=None,
        )


async def scenario_bulk(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    async with system_in_fresh_database(opts, name) as system, system.producer() as prod:
        await prod.enqueue_batch(range(-10, 0))  # warm-up
        started = perf_counter()
        for lo in range(0, s.bulk_jobs, s.bulk_batch):
            await prod.enqueue_batch(range(lo, min(lo + s.bulk_batch, s.bulk_jobs)))
        rate = s.bulk_jobs / (perf_counter() - started)
        note = None
        if system.bulk_note and name == "pgoutbox" and "loop" in system.bulk_note:
            note = "loop"
            results.footnotes["loop"] = (
                "pgoutbox has no enqueue_many in this tree: a loop of enqueue in one transaction"
            )
    label = f"{s.bulk_jobs:,} jobs in batches of {s.bulk_batch:,}"
    results.add("bulk", label, "jobs/s", name, rate, higher_is_better=True, note=note)
    log(f"  bulk {name}: {rate:,.0f} jobs/s ({system.bulk_note})")


async def drain_rate(
    opts: Options,
    system: System,
    *,
    preload: int,
    processes: int,
    target: int,
    cap: float,
    until_acked: bool,
) -> tuple[float, bool, bool]:
    """Pre-load, start worker processes, time `target` jobs.

    Returns jobs/s, whether the time cap cut it short, and whether there were
    more handler calls than jobs (some ran twice).
    """
    await system.enqueue_bulk(preload)
    await settle(system.dsn)
    counters = Counters(opts.log_dir, processes)
    try:
        specs = [ProbeSpec(counters.path, slot) for slot in range(processes)]
        async with system.start_workers(
            specs, log_dir=opts.log_dir, profile_dir=opts.profile_dir
        ) as group:
            started = await group.go()
            n, at, capped = await wait_count(
                counters, group.check_alive, target, cap=cap, started=started
            )
            if not capped and until_acked:
                at = await system.wait_drained(timeout=max(60.0, cap))
            elif capped:
                n = counters.total()
                at = perf_counter()
            twice = counters.total() > preload
    finally:
        counters.close()
    return n / (at - started), capped, twice


async def scenario_drain(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    for processes in (1, 2):
        async with system_in_fresh_database(opts, name) as system:
            rate, capped, twice = await drain_rate(
                opts,
                system,
                preload=s.drain_jobs,
                processes=processes,
                target=s.drain_jobs,
                cap=s.drain_cap,
                until_acked=True,
            )
        note = None
        also = None
        if twice:
            also = "twice"
            results.footnotes["twice"] = "more handler calls than jobs: some jobs ran twice"
        if capped:
            note = "cap"
            results.footnotes["cap"] = (
                f"time cap: the drain was cut off after {s.drain_cap:.0f} s; "
                "figure = jobs run ÷ time"
            )
        label = f"{s.drain_jobs:,} jobs, {processes} process{'es' if processes > 1 else ''}"
        results.add(
            "drain", label, "jobs/s", name, rate, higher_is_better=True, note=note, also=also
        )
        log(f"  drain {name} {processes}p: {rate:,.0f} jobs/s{' (capped)' if capped else ''}")


@asynccontextmanager
async def latency_worker(
    opts: Options, system: System, rep: Reports
) -> AsyncIterator[Callable[[], None]]:
    """One worker process reporting start times to `rep`; yields its liveness check."""
    counters = Counters(opts.log_dir, 1)
    try:
        spec = ProbeSpec(counters.path, 0, rep.times.path, rep.port)
        async with system.start_workers(
            [spec], log_dir=opts.log_dir, profile_dir=opts.profile_dir
        ) as group:
            await group.go()
            async with system.producer() as prod:
                for w in range(1, WARMUP_JOBS + 1):
                    await prod.enqueue_one(-w)
                    try:
                        await rep.wait_for(-w, JOB_START_TIMEOUT * 2)
                    except RuntimeError as ex:
                        group.check_alive()
                        raise RuntimeError(f"{ex}; worker stderr:\n{group.log_tail()}") from None
            yield group.check_alive
    finally:
        counters.close()


async def scenario_idle(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    latencies: list[float] = []
    note = None
    async with (
        system_in_fresh_database(opts, name) as system,
        reports(opts, s.idle_jobs) as rep,
        latency_worker(opts, system, rep) as check_alive,
        system.producer() as prod,
    ):
        started_at = perf_counter()
        for i in range(s.idle_jobs):
            if perf_counter() - started_at > s.idle_cap:
                note = "idle-cap"
                results.footnotes["idle-cap"] = (
                    f"cut off after {s.idle_cap:.0f} s: percentiles of the jobs run by then"
                )
                break
            await prod.enqueue_one(i)
            committed = perf_counter()
            try:
                started = await rep.wait_for(i, JOB_START_TIMEOUT)
            except RuntimeError:
                check_alive()
                raise
            latencies.append((started - committed) * 1000)
            await anyio.sleep(IDLE_GAP)
    for pct in PERCENTILES:
        value = percentile(latencies, pct)
        results.add("idle", f"p{pct}", "ms", name, value, higher_is_better=False, note=note)
    log(
        f"  idle {name}: p50 {percentile(latencies, 50):.2f} ms, "
        f"p99 {percentile(latencies, 99):.2f} ms"
    )


async def capacity(opts: Options, results: Results, name: str) -> float:
    """The system's 1-process drain capacity: from ``drain`` if it ran, else calibrated."""
    label = f"{opts.sizes.drain_jobs:,} jobs, 1 process"
    measured = results.median("drain", label, name)
    if measured is not None:
        return measured
    if name in results.capacities:
        return results.capacities[name]
    async with system_in_fresh_database(opts, name) as system:
        rate, _, _ = await drain_rate(
            opts,
            system,
            preload=opts.sizes.calibrate_jobs,
            processes=1,
            target=opts.sizes.calibrate_jobs,
            cap=opts.sizes.drain_cap,
            until_acked=True,
        )
    log(f"  load {name}: calibrated capacity {rate:,.0f} jobs/s")
    results.capacities[name] = rate
    return rate


async def scenario_load(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    # One rate for all: half of the reference system's capacity (pgoutbox's);
    # a system that cannot take twice that gets half of its own, marked.
    reference = "pgoutbox" if "pgoutbox" in opts.systems else opts.systems[0]
    note = None
    common = own = 0.0
    if opts.load_rate is not None:
        rate = opts.load_rate
    else:
        common = await capacity(opts, results, reference)
        own = await capacity(opts, results, name)
        rate = LOAD_FRACTION * min(common, own)
    if own < common:
        note = "own"
        results.footnotes["own"] = (
            f"offered half of this system's own capacity, which is below {reference}'s"
        )
    total = max(10, int(rate * s.load_seconds))
    # Commits are fsync-bound (and NOTIFY serialises them), so above a few hundred
    # transactions/s the producers write small batches: a transaction every
    # `interval` seconds with the jobs due by then (one job: `enqueue_one`).
    interval = max(1 / rate, 1 / LOAD_MAX_TRANSACTIONS)
    ticks = int(total / (rate * interval)) + 1
    commits: dict[int, float] = {}
    async with (
        system_in_fresh_database(opts, name) as system,
        reports(opts, total) as rep,
        latency_worker(opts, system, rep) as check_alive,
        AsyncExitStack() as stack,
    ):
        prods = [await stack.enter_async_context(system.producer()) for _ in range(LOAD_PRODUCERS)]
        for k, prod in enumerate(prods):
            await prod.enqueue_one(-100 - k)
        next_tick = count()
        t0 = perf_counter() + 0.05

        async def produce(k: int) -> None:
            prod = prods[k]
            while (tick := next(next_tick)) < ticks:
                lo = min(total, int(tick * interval * rate))
                hi = min(total, int((tick + 1) * interval * rate))
                if lo == hi:
                    continue
                delay = t0 + tick * interval - perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                if hi - lo == 1:
                    await prod.enqueue_one(lo)
                else:
                    await prod.enqueue_batch(range(lo, hi))
                now = perf_counter()
                for i in range(lo, hi):
                    commits[i] = now

        async with anyio.create_task_group() as tg:
            for k in range(LOAD_PRODUCERS):
                tg.start_soon(produce, k)
        achieved = len(commits) / (max(commits.values()) - t0)
        started: dict[int, float] = {}
        with anyio.move_on_after(JOB_START_TIMEOUT):
            while len(started) < len(commits):
                for i in commits:
                    if i not in started and (t := rep.times.get(i)) is not None:
                        started[i] = t
                check_alive()
                await anyio.sleep(0.05)
    if len(started) < len(commits):
        raise RuntimeError(f"{len(commits) - len(started)} of {total} jobs did not start")
    latencies = [(started[i] - t) * 1000 for i, t in commits.items()]
    per_tx = total / ticks
    results.add("load", "offered rate", "jobs/s", name, achieved, higher_is_better=None, note=note)
    results.add("load", "jobs per transaction", "jobs", name, per_tx, higher_is_better=None)
    for pct in PERCENTILES:
        results.add(
            "load", f"p{pct}", "ms", name, percentile(latencies, pct), higher_is_better=False
        )
    log(
        f"  load {name} @ {achieved:,.0f} jobs/s (target {rate:,.0f}, {per_tx:.1f} per tx): "
        f"p50 {percentile(latencies, 50):.2f} ms, p99 {percentile(latencies, 99):.2f} ms"
    )


async def scenario_backlog(opts: Options, results: Results, name: str) -> None:
    s = opts.sizes
    rates = {}
    for waiting in (s.backlog_small, s.backlog_big):
        async with system_in_fresh_database(opts, name) as system:
            loaded = perf_counter()
            rate, capped, _ = await drain_rate(
                opts,
                system,
                preload=waiting,
                processes=1,
                target=s.backlog_window,
                cap=s.backlog_cap,
                until_acked=False,
            )
            loaded = perf_counter() - loaded
        rates[waiting] = rate
        note = None
        if capped:
            note = "window"
            results.footnotes["window"] = (
                f"backlog window cut off after {s.backlog_cap:.0f} s "
                f"before {s.backlog_window:,} jobs ran; figure = jobs run ÷ time"
            )
        results.add(
            "backlog",
            f"{waiting:,} waiting",
            "jobs/s",
            name,
            rate,
            higher_is_better=True,
            note=note,
        )
        log(
            f"  backlog {name} {waiting:,} waiting: {rate:,.0f} jobs/s "
            f"({'capped, ' if capped else ''}{loaded:.0f} s with pre-load)"
        )
    results.add(
        "backlog",
        f"{s.backlog_big:,} ÷ {s.backlog_small:,}",
        "x",
        name,
        rates[s.backlog_big] / rates[s.backlog_small],
        higher_is_better=None,
    )


SCENARIO_FUNCTIONS: Final[dict[str, Callable[[Options, Results, str], Awaitable[None]]]] = {
    "single": scenario_single,
    "notify": scenario_notify,
    "bulk": scenario_bulk,
    "drain": scenario_drain,
    "idle": scenario_idle,
    "load": scenario_load,
    "backlog": scenario_backlog,
}


# -- report --------------------------------------------------------------------


def log(message: str) -> None:
    """Progress, to stderr."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: float) -> str:
    """About three significant digits."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


SCENARIO_TITLES: Final = {
    "single": "1. single enqueue (one job per transaction)",
    "notify": "1b. NOTIFY cost: single enqueue, with and without NOTIFY",
    "bulk": "2. bulk enqueue",
    "drain": "3. drain of pre-loaded no-op jobs",
    "idle": "4. idle latency: commit → handler start, one job at a time",
    "load": "5. latency under load: commit → handler start, producers at a fixed rate",
    "backlog": "6. backlog: 1-process drain throughput with many jobs waiting",
}


def scenario_rows(results: Results, scenario: str, systems: Sequence[str]) -> list[list[str]]:
    """Rows of one scenario's table: metric, system, median, min-max, ratio."""
    rows = []
    for (scen, _label), metric in results.metrics.items():
        if scen != scenario:
            continue
        base = metric.values.get("pgoutbox")
        base_median = statistics.median(base) if base else None
        first = True
        for system in systems:
            values = metric.values.get(system)
            if not values:
                continue
            median = statistics.median(values)
            notes = "".join(
                f" [{n}]" for n in sorted(metric.notes.get(system, ())) if n in results.footnotes
            )
            if metric.higher_is_better is None or base_median is None or median == 0:
                ratio = "—"
            else:
                ratio = f"{base_median / median:.2f}"
            rows.append(
                [
                    f"{metric.label} ({metric.unit})" if first else "",
                    system,
                    fmt(median) + notes,
                    f"{fmt(min(values))}-{fmt(max(values))}" if len(values) > 1 else "",
                    str(len(values)),
                    ratio,
                ]
            )
            first = False
    return rows


HEADER: Final = ["metric", "system", "median", "min-max", "runs", "pgoutbox ÷"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [HEADER, *rows]) for c in range(len(HEADER))]
    lines = []
    for r in [HEADER, *rows]:
        cells = [
            cell.ljust(w) if c < 2 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 4) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def source_revision() -> str:
    """The git revision of the working tree, or "?"."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


async def machine_facts(admin_dsn: str) -> str:
    """One line describing where the suite ran."""
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        settings = {}
        for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
            cur = await conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name)))
            row = await cur.fetchone()
            settings[name] = str(row[0]) if row else "?"
    pg = settings["server_version"].split()[0]
    return (
        f"machine: cpus={os.cpu_count()} python={platform.python_version()} "
        f"postgresql={pg} (fsync={settings['fsync']}, "
        f"synchronous_commit={settings['synchronous_commit']}, "
        f"shared_buffers={settings['shared_buffers']}) "
        f"psycopg={version('psycopg')} asyncpg={version('asyncpg')} "
        f"pgqueuer={version('pgqueuer')} procrastinate={version('procrastinate')} "
        f"uvloop={version('uvloop')} anyio={version('anyio')} "
        f"pgoutbox={version('pgoutbox')} ({source_revision()})"
    )


def render(
    results: Results,
    opts: Options,
    facts: str,
    configs: dict[str, str],
    elapsed: float,
    *,
    markdown: bool,
    extra: str = "",
) -> str:
    s = opts.sizes
    out: list[str] = []
    title = "pgoutbox comparative benchmarks" + (" (--quick)" if opts.quick else "")
    out.append(f"# {title}" if markdown else title)
    out.append("")
    out.append(facts)
    out.append("")
    if extra:
        out.append(extra)
        out.append("")
    out.append(
        f"runs: {s.runs} per figure (median, min-max), backlog {s.backlog_runs}; "
        f"every measurement in a fresh database; suite took "
        + (f"{elapsed / 60:.1f} min" if elapsed >= 120 else f"{elapsed:.0f} s")
    )
    if results.loads:
        out.append(
            f"1-min load average at measurement starts: {min(results.loads):.1f}-"
            f"{max(results.loads):.1f} (median {statistics.median(results.loads):.1f}) "
            f"on {os.cpu_count()} cpus"
        )
    out.append(
        "ratio column = pgoutbox ÷ system: throughput > 1 and latency < 1 mean pgoutbox is better"
    )
    out.append("")
    out.append("systems:" if not markdown else "Systems:")
    out.extend(f"- {name}: {configs[name]}" for name in opts.systems if name in configs)
    for scenario in opts.scenarios:
        rows = scenario_rows(results, scenario, opts.systems)
        if not rows:
            continue
        out.append("")
        heading = SCENARIO_TITLES[scenario]
        out.append(f"## {heading}" if markdown else heading)
        out.append("")
        out.append(markdown_table(rows) if markdown else text_table(rows))
    used = {n for m in results.metrics.values() for ns in m.notes.values() for n in ns}
    notes = [f"[{k}] {v}" for k, v in results.footnotes.items() if k in used]
    if notes or results.errors:
        out.append("")
        out.extend(f"- {n}" if markdown else n for n in notes)
        out.extend(f"- error: {e}" if markdown else f"error: {e}" for e in results.errors)
    return "\n".join(out) + "\n"


# -- main ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get(ADMIN_DSN_ENV) or DEFAULT_ADMIN_DSN,
        help=f"admin connection string (default: ${ADMIN_DSN_ENV} or %(default)r)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure")
    parser.add_argument("--systems", default=",".join(NAMES))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--write-results", action="store_true", help=f"also write Markdown to {RESULTS_PATH}"
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        default=None,
        metavar="JOBS_PER_S",
        help="offer this rate to every system in the load scenario (default: half of "
        "pgoutbox's 1-process drain capacity)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help=f"write the raw figures as JSON (default with --write-results: {JSON_PATH})",
    )
    parser.add_argument(
        "--peers-from",
        metavar="PATH",
        default=None,
        help="take the figures of the systems not measured now from this JSON "
        "(e.g. re-measure only pgoutbox after a change: --systems pgoutbox "
        f"--peers-from {JSON_PATH.name})",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        default=None,
        help="run every worker process under `py-spy record` and write its raw "
        "(collapsed) stacks to DIR; the figures then include py-spy's overhead",
    )
    ns = parser.parse_args(argv)
    sizes = QUICK if ns.quick else FULL
    if ns.runs is not None:
        if ns.runs < 1:
            parser.error("--runs must be >= 1")
        sizes = dataclasses.replace(sizes, runs=ns.runs)
    systems = tuple(x.strip() for x in ns.systems.split(",") if x.strip())
    scenarios = tuple(x.strip() for x in ns.scenarios.split(",") if x.strip())
    for name in systems:
        if name not in NAMES:
            parser.error(f"unknown system {name!r}; choose from {', '.join(NAMES)}")
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return Options(
        dsn=ns.dsn,
        quick=ns.quick,
        sizes=sizes,
        systems=systems,
        scenarios=tuple(s for s in SCENARIOS if s in scenarios),
        write_results=ns.write_results,
        json_path=ns.json or (str(JSON_PATH) if ns.write_results else None),
        peers_from=ns.peers_from,
        load_rate=ns.load_rate,
        log_dir="",
        profile_dir=str(Path(ns.py_spy).resolve()) if ns.py_spy else None,
    )


async def guarded(results: Results, what: str, step: Callable[[], Awaitable[None]]) -> None:
    """Run one measurement; record and report an error instead of stopping the suite."""
    results.loads.append(os.getloadavg()[0])
    try:
        await step()
    except Exception as ex:  # one failing system must not sink the others' figures
        message = f"{what}: {type(ex).__name__}: {ex}"
        results.errors.append(message.splitlines()[0])
        log(f"  ERROR {message}")
        log(traceback.format_exc())


@dataclass(slots=True)
class Outcome:
    """What a suite run measured, for `report`."""

    opts: Options
    results: Results
    facts: str
    configs: dict[str, str]
    measured: tuple[str, ...]
    elapsed: float


async def run_suite(opts: Options) -> Outcome:
    """Run the suite; on SIGINT/SIGTERM cancel it cleanly and raise KeyboardInterrupt.

    The signals are taken over so that the cancellation is anyio's: the
    shielded clean-ups (stopping worker processes, dropping databases) then
    run to the end and the cancellation still stops the suite.
    """
    interrupted = False
    outcome: Outcome | None = None
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    interrupted = True
                    log("interrupted: stopping workers and dropping databases")
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        outcome = await measure_all(opts)
        tg.cancel_scope.cancel()
    if interrupted or outcome is None:
        raise KeyboardInterrupt
    return outcome


async def measure_all(opts: Options) -> Outcome:
    """Every selected scenario, run after run, system after system."""
    started = perf_counter()
    facts = await machine_facts(opts.dsn)
    log(facts)
    results = Results()
    configs: dict[str, str] = {}
    available = []
    for name in opts.systems:
        try:
            configs[name] = load(name).config
            available.append(name)
        except ImportError as ex:
            log(f"skipping {name}: {ex}")
            results.errors.append(f"{name} skipped: {ex}")
    opts = dataclasses.replace(opts, systems=tuple(available))
    s = opts.sizes
    for scenario in opts.scenarios:
        runs = s.backlog_runs if scenario == "backlog" else s.runs
        log(f"== {scenario} ({runs} run{'s' if runs > 1 else ''})")
        for run in range(1, runs + 1):
            log(f" run {run}/{runs}")
            for name in opts.systems:
                what = f"{scenario} {name} run {run}"
                await guarded(
                    results, what, partial(SCENARIO_FUNCTIONS[scenario], opts, results, name)
                )
    return Outcome(opts, results, facts, configs, tuple(available), perf_counter() - started)


def report(outcome: Outcome) -> None:
    """Print the tables; write the JSON and the Markdown when asked."""
    opts, results, configs = outcome.opts, outcome.results, outcome.configs
    sizes = dataclasses.asdict(opts.sizes)
    extra = ""
    if peers_from := opts.peers_from:
        data = json.loads(Path(peers_from).read_text())
        saved_sizes = data.get("sizes", {})
        if any(saved_sizes.get(k, v) != v for k, v in sizes.items() if k != "runs"):
            log(f"warning: {peers_from} was measured with other sizes")
        merged = results.merge_peers(data, outcome.measured)
        for name in merged:
            configs.setdefault(name, data["configs"].get(name, "?"))
        opts = dataclasses.replace(
            opts, systems=tuple(n for n in NAMES if n in {*outcome.measured, *merged})
        )
        extra = (
            f"figures of {', '.join(n for n in NAMES if n in merged)} are from an earlier "
            f"run ({Path(peers_from).name}, pgoutbox {data['facts'].split(' pgoutbox=')[-1]}); "
            f"measured in this run: {', '.join(outcome.measured)}"
        )
    if opts.json_path:
        saved = {"facts": outcome.facts, "configs": configs, "sizes": sizes}
        Path(opts.json_path).write_text(json.dumps({**saved, **results.to_json()}, indent=1))
        log(f"wrote {opts.json_path}")
    args = (results, opts, outcome.facts, configs, outcome.elapsed)
    print()
    print(render(*args, markdown=False, extra=extra))
    if opts.write_results:
        RESULTS_PATH.write_text(render(*args, markdown=True, extra=extra))
        log(f"wrote {RESULTS_PATH}")


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="pgoutbox-suite-") as log_dir:
        opts = dataclasses.replace(opts, log_dir=log_dir)
        try:
            report(anyio.run(run_suite, opts, backend="asyncio"))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sweep_databases(opts.dsn)
    if interrupted:
        print("interrupted (the benchmark databases were dropped)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
