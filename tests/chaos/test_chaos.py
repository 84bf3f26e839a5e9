"""Chaos: jobs keep flowing while workers are SIGKILLed, their backends terminated, the
network to one of them blackholed and PostgreSQL restarted. Afterwards every committed
job is completed (none lost, none stuck), every plain handler ran at least once, every
exactly-once effect exists exactly once, and no rolled-back job exists.

    python -m pytest -m chaos                              # the short run (~30 s; in .ci/run)
    PGOUTBOX_CHAOS_SECONDS=120 python -m pytest -m chaos   # longer

The test owns its PostgreSQL server (`_server.py`), so it may restart it; one of
the three worker processes reaches it through a TCP proxy the test controls
(`_proxy.py`). The producer runs in the test process; faults come one at a time
in a shuffled cycle (kill a random worker and start a replacement; terminate
every worker backend; blackhole the proxy for a few seconds; restart the
server, alternately ``-m fast`` and ``-m immediate``) until
``$PGOUTBOX_CHAOS_SECONDS`` have passed and every kind happened at least once.

After each fault the test polls the database (every `POLL` s) and reports, in
seconds:

* *drain*: from the injection until every job committed before the fault is
  terminal (for a blackhole its length is included). A job still not terminal
  `FAULT_DRAIN_LIMIT` s later is listed as stuck and left out of later drains.
* *first*: from the end of the fault (heal, restart done; the injection for the
  others) until the first job finished after it (``finished_at``).
* *recovery*: from the end of the fault until each affected worker started a
  job again (the replacement of a killed worker, the proxied worker after a
  blackhole, every worker otherwise), from the handlers' own rows.

The summary is printed (shown without ``-s``) and written to
``$PGOUTBOX_CHAOS_REPORT`` if set. ``$PGOUTBOX_CHAOS_SEED`` replays a fault
sequence; ``$PGOUTBOX_CHAOS_LOGS`` names a directory to keep the worker and
server logs in.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, LiteralString

import anyio
import psycopg
import pytest
from psycopg import sql

import pgoutbox

from . import chaos_app
from ._proxy import Proxy
from ._server import EmergencyStop, OwnedServer, ServerUnavailableError, owned_server
from .chaos_worker import PARENT_ENV

SECONDS: Final = float(os.environ.get("PGOUTBOX_CHAOS_SECONDS") or 15)
"""How long jobs flow and faults strike (at least one fault of each kind happens)."""

SEED: Final = int(os.environ.get("PGOUTBOX_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
REPORT_ENV: Final = "PGOUTBOX_CHAOS_REPORT"
LOGS_ENV: Final = "PGOUTBOX_CHAOS_LOGS"

REPO: Final = Path(__file__).resolve().parents[2]
WORKERS: Final = 3
PROXIED_SLOT: Final = 2
"""The worker slot whose connections all go through the proxy."""
BACKENDS: Final = ("asyncio", "trio")
"""Worker incarnations alternate between these, so each slot runs on both in turn."""

RATE: Final = 40.0
"""Jobs the producer enqueues per second (half of each kind)."""
ROLLBACK_SHARE: Final = 0.1
"""Share of enqueues made in a transaction that is rolled back."""
CALM: Final = (0.5, 1.5)
"""Seconds of calm before each fault (uniform)."""
BLACKHOLE: Final = (2.0, 4.0)
"""Seconds a blackhole lasts (uniform)..."""
LONG_BLACKHOLE: Final = 12.0
"""...except every second one in runs of a minute or more: longer than pgoutbox's
10 s statement and probe timeouts, so those paths run too."""
BUSY_WAIT: Final = 3.0
"""Seconds a kill or blackhole waits for its target to have jobs in flight."""
FAULT_DRAIN_LIMIT: Final = 25.0
"""Seconds a fault's drain is awaited (the longest blackhole plus a margin)."""
FINAL_DRAIN_LIMIT: Final = 30.0
STOP_LIMIT: Final = 30.0
POLL: Final = 0.1
"""Seconds between the test's polls of the database (it runs in another process)."""

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(int(SECONDS * 4 + 300))]


# -- worker processes ----------------------------------------------------------------------


@dataclass
class WorkerProcess:
    slot: int
    incarnation: int
    backend: str
    proxied: bool
    log: Path
    process: subprocess.Popen[bytes]
    how_ended: str = "running"


class Fleet:
    """The worker processes: one per slot, replaced when killed."""

    def __init__(self, logs: Path, *, direct_dsn: str, proxy_dsn: str, schema: str) -> None:
        self.logs = logs
        self._dsn = {False: direct_dsn, True: proxy_dsn}
        self._schema = schema
        self.current: dict[int, WorkerProcess] = {}
        self.history: list[WorkerProcess] = []
        self.kills = 0
        self.unexpected: list[WorkerProcess] = []

    def spawn(self, slot: int) -> WorkerProcess:
        """Start the next incarnation of `slot` (call from the main thread: see chaos_worker)."""
        incarnation = sum(1 for w in self.history if w.slot == slot)
        backend = BACKENDS[(slot + incarnation) % len(BACKENDS)]
        proxied = slot == PROXIED_SLOT
        log = self.logs / f"worker-{slot}-{incarnation}-{backend}.log"
        env = {
            **os.environ,
            "PGOUTBOX_DSN": self._dsn[proxied],
            chaos_app.SCHEMA_ENV: self._schema,
            PARENT_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.chaos_worker", "--backend", backend],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(slot, incarnation, backend, proxied, log, process)
        self.current[slot] = worker
        self.history.append(worker)
        return worker

    def kill(self, slot: int) -> WorkerProcess:
        """SIGKILL the worker of `slot`, wait for it, and start a replacement."""
        worker = self.current[slot]
        worker.process.kill()
        worker.process.wait(timeout=10)
        worker.how_ended = "SIGKILL (fault)"
        self.kills += 1
        self.spawn(slot)
        return worker

    def check(self) -> None:
        """Replace workers that exited on their own (and remember them: that is a failure)."""
        for slot, worker in list(self.current.items()):
            if worker.process.poll() is not None:
                worker.how_ended = f"exited by itself with {worker.process.returncode}"
                self.unexpected.append(worker)
                self.spawn(slot)

    def stop(self, timeout: float) -> None:
        """SIGTERM every current worker (a graceful stop) and wait up to `timeout` in all."""
        self.check()
        for worker in self.current.values():
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.current.values():
            try:
                code = worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                worker.how_ended = f"SIGTERM, exit {code}"
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
                worker.how_ended = f"did not stop within {timeout:.0f} s of SIGTERM: killed"

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (clean-up; safe to call twice)."""
        for worker in self.history:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.how_ended = "SIGKILL (clean-up)"
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=10)

    def pids(self, *, proxied: bool | None = None) -> list[int]:
        return [
            w.process.pid for w in self.current.values() if proxied is None or w.proxied == proxied
        ]


# -- the test's own database access -------------------------------------------------------


def _q(statement: LiteralString, schema: str) -> sql.Composed:
    """`statement` with ``{s}`` replaced by the quoted schema."""
    return sql.SQL(statement).format(s=sql.Identifier(schema))


class Admin:
    """The test's connection for polling and terminating; reconnects after faults."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: pgoutbox.Connection[Any] | None = None

    async def query(
        self, statement: sql.Composed | LiteralString, params: list[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        deadline = anyio.current_time() + FAULT_DRAIN_LIMIT
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await pgoutbox.connect(
                        self._dsn,
                        autocommit=True,
                        application_name="chaos-test-admin",
                        connect_timeout=3,
                    )
                cur = await self._conn.execute(statement, params)
                return await cur.fetchall()
            except psycopg.OperationalError:
                await self.aclose()
                if anyio.current_time() > deadline:
                    raise
                await anyio.sleep(POLL)  # the server is restarting: try again

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


# -- the producer ---------------------------------------------------------------------------


@dataclass
class Producer:
    """Enqueues both kinds of jobs at `RATE`, each in its own transaction, until stopped.

    A job whose INSERT succeeded but whose COMMIT raised is *unknown*: it may
    or may not exist, and is checked at the end. An error before COMMIT
    means nothing was committed.
    """

    dsn: str
    rng: random.Random
    committed: dict[int, str] = field(default_factory=dict)
    unknown: dict[int, str] = field(default_factory=dict)
    rolled_back: dict[int, str] = field(default_factory=dict)
    failed_before_commit: int = 0
    connect_failures: int = 0
    last_committed_id: int = 0
    _stop: anyio.Event = field(default_factory=anyio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        conn: pgoutbox.Connection[Any] | None = None
        n = 0
        next_at = anyio.current_time()
        try:
            while True:
                next_at = max(next_at + 1 / RATE, anyio.current_time() - 1.0)
                with anyio.move_on_after(max(0.0, next_at - anyio.current_time())):
                    await self._stop.wait()
                if self._stop.is_set():
                    return
                if conn is None or conn.closed:
                    try:
                        conn = await pgoutbox.connect(
                            self.dsn, application_name="chaos-test-producer", connect_timeout=3
                        )
                    except psycopg.OperationalError:
                        self.connect_failures += 1
                        conn = None
                        continue
                n += 1
                if not await self._enqueue(conn, n):
                    await conn.close()
        finally:
            if conn is not None:
                await conn.close()

    async def _enqueue(self, conn: pgoutbox.Connection[Any], n: int) -> bool:
        """Enqueue one job; False if the connection failed."""
        task = self.rng.choice([chaos_app.plain, chaos_app.exactly_once])
        rollback = self.rng.random() < ROLLBACK_SHARE
        job_id: int | None = None
        try:
            async with conn.transaction(force_rollback=rollback):
                job_id = (await chaos_app.queue.enqueue(conn, task, n)).id
        except psycopg.Error:
            if job_id is None:
                self.failed_before_commit += 1
            elif rollback:
                self.rolled_back[job_id] = task.name  # a failed ROLLBACK commits nothing either
            else:
                self.unknown[job_id] = task.name
            return False
        if rollback:
            self.rolled_back[job_id] = task.name
        else:
            self.committed[job_id] = task.name
            self.last_committed_id = job_id
        return True


# -- faults ---------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float
    """Seconds since the chaos phase began."""
    wall: float
    """``time.time()`` at injection (compared with ``finished_at``)."""
    detail: str
    in_flight: int
    """Jobs running on the affected workers when the fault struck."""
    before_id: int
    """The last job committed before the fault."""
    ended: float = 0.0
    """``time.time()`` when the fault was over (healed, restarted; = `wall` for the others)."""
    affected: list[int] = field(default_factory=list)
    """PIDs of the workers that must recover: the replacement, the proxied one, or all."""
    drain: float | None = None
    """Seconds from injection until every job committed before it was terminal."""
    first_completion: float | None = None
    """Seconds from the fault's end until the first job finished after it."""
    recovery: float | None = None
    """Seconds from the fault's end until every affected worker had started a job again."""


@dataclass
class Chaos:
    """Everything the fault loop works on, and what it counts."""

    server: OwnedServer
    proxy: Proxy
    fleet: Fleet
    admin: Admin
    producer: Producer
    schema: str
    rng: random.Random
    started: float = 0.0
    started_wall: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    terminated_backends: int = 0
    blackhole_seconds: list[float] = field(default_factory=list)
    restart_modes: list[str] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)
    stuck: set[int] = field(default_factory=set)
    """Jobs still not terminal `FAULT_DRAIN_LIMIT` s after a fault."""
    stuck_details: list[str] = field(default_factory=list)

    async def running_jobs(self, pids: list[int] | None = None) -> int:
        if pids is None:
            rows = await self.admin.query(
                _q("SELECT count(*) FROM {s}.jobs WHERE state = 'running'", self.schema)
            )
        else:
            rows = await self.admin.query(
                _q(
                    "SELECT count(*) FROM {s}.jobs j JOIN {s}.workers w ON w.id = j.worker_id "
                    "WHERE j.state = 'running' AND w.pid = ANY(%s)",
                    self.schema,
                ),
                [pids],
            )
        return int(rows[0][0])

    async def busy(self, pids: list[int]) -> int:
        """Jobs running on these workers, once there are some (or after `BUSY_WAIT` s).

        Faults aimed at some workers wait for them to be busy: a fault that
        finds nothing in flight tests little.
        """
        deadline = anyio.current_time() + BUSY_WAIT
        while True:
            running = await self.running_jobs(pids)
            if running or anyio.current_time() >= deadline:
                return running
            await anyio.sleep(POLL / 2)

    def _strike(self, kind: str, in_flight: int) -> Fault:
        """A fault of `kind` injected now (call just before injecting it)."""
        return Fault(
            kind=kind,
            at=anyio.current_time() - self.started,
            wall=time.time(),
            detail="",
            in_flight=in_flight,
            before_id=self.producer.last_committed_id,
        )

    async def kill(self) -> Fault:
        slot = self.rng.randrange(WORKERS)
        victim = self.fleet.current[slot]
        fault = self._strike("kill", await self.busy([victim.process.pid]))
        self.fleet.kill(slot)
        fault.ended = time.time()
        fault.affected = [self.fleet.current[slot].process.pid]
        fault.detail = f"slot {slot} ({victim.backend}{', proxied' if victim.proxied else ''})"
        return fault

    async def terminate(self) -> Fault:
        fault = self._strike("terminate", await self.running_jobs())
        rows = await self.admin.query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND datname = current_database() AND application_name NOT LIKE 'chaos-test%'"
        )
        count = int(rows[0][0])
        self.terminated_backends += count
        fault.ended = time.time()
        fault.affected = self.fleet.pids()
        fault.detail = f"{count} backends"
        return fault

    async def blackhole(self) -> Fault:
        long_run = SECONDS >= 60 and len(self.blackhole_seconds) % 2 == 1
        seconds = LONG_BLACKHOLE if long_run else self.rng.uniform(*BLACKHOLE)
        fault = self._strike("blackhole", await self.busy(self.fleet.pids(proxied=True)))
        self.proxy.blackhole()
        try:
            await anyio.sleep(seconds)  # the fault's length, not a synchronisation
        finally:
            self.proxy.heal()
        self.blackhole_seconds.append(seconds)
        fault.ended = time.time()
        fault.affected = self.fleet.pids(proxied=True)
        fault.detail = f"{seconds:.1f} s"
        return fault

    async def restart(self) -> Fault:
        mode = ("fast", "immediate")[len(self.restart_modes) % 2]
        in_flight = await self.running_jobs()
        await self.admin.aclose()
        fault = self._strike("restart", in_flight)
        await anyio.to_thread.run_sync(self.server.restart, mode)
        took = anyio.current_time() - self.started - fault.at
        self.restart_modes.append(mode)
        self.restart_seconds.append(took)
        fault.ended = time.time()
        fault.affected = self.fleet.pids()
        fault.detail = f"-m {mode}, {took:.1f} s"
        return fault

    async def drain_time(self, fault: Fault) -> float | None:
        """Seconds from injection until every job committed before it is terminal.

        Jobs an earlier fault left undrained past `FAULT_DRAIN_LIMIT` are left
        out (and listed in `stuck`), so that one stuck job does not make
        every later measurement time out too.
        """
        started = self.started + fault.at
        query = _q(
            "SELECT id FROM {s}.jobs WHERE id <= %s AND id <> ALL(%s::bigint[]) "
            "AND state NOT IN ('completed', 'failed', 'cancelled')",
            self.schema,
        )
        while True:
            rows = await self.admin.query(query, [fault.before_id, sorted(self.stuck)])
            if not rows:
                return anyio.current_time() - started
            if anyio.current_time() - started > FAULT_DRAIN_LIMIT:
                await self._note_stuck(sorted(row[0] for row in rows))
                fault.detail += f"; not drained: jobs {sorted(row[0] for row in rows)[:10]}"
                return None
            await anyio.sleep(POLL)

    async def _note_stuck(self, job_ids: list[int]) -> None:
        """Remember jobs that did not drain, and how they looked then."""
        self.stuck.update(job_ids)
        rows = await self.admin.query(
            _q(
                "SELECT j.id, j.task, j.state::text, j.attempt, "
                "extract(epoch FROM j.attempted_at)::float8, w.pid, "
                "extract(epoch FROM now() - w.heartbeat_at)::float8 "
                "FROM {s}.jobs j LEFT JOIN {s}.workers w ON w.id = j.worker_id "
                "WHERE j.id = ANY(%s) ORDER BY j.id LIMIT 10",
                self.schema,
            ),
            [job_ids],
        )
        for job_id, task, state, attempt, claimed, pid, silent in rows:
            holder = (
                "no worker"
                if pid is None
                else f"worker pid {pid} (last heartbeat {silent:.1f} s ago, "
                f"{'alive' if pid in self.fleet.pids() else 'gone'})"
            )
            self.stuck_details.append(
                f"job {job_id} ({task}) {state}, attempt {attempt}, claimed "
                f"{_when(self, claimed)}, held by {holder}"
            )

    async def run(self) -> None:
        """Faults in shuffled cycles until `SECONDS` passed (one full cycle at least)."""
        self.started, self.started_wall = anyio.current_time(), time.time()
        inject: dict[str, Callable[[], Awaitable[Fault]]] = {
            "kill": self.kill,
            "terminate": self.terminate,
            "blackhole": self.blackhole,
            "restart": self.restart,
        }
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.producer.run)
            try:
                while not self.faults or anyio.current_time() - self.started < SECONDS:
                    kinds = list(inject)
                    self.rng.shuffle(kinds)
                    for kind in kinds:
                        await anyio.sleep(self.rng.uniform(*CALM))  # calm between faults
                        fault = await inject[kind]()
                        self.faults.append(fault)
                        fault.drain = await self.drain_time(fault)
                        self.fleet.check()
            finally:
                self.producer.stop()
                await self.admin.aclose()


# -- set-up, final drain, verification -------------------------------------------------


def _wait_until(condition: Callable[[], bool], limit: float) -> float | None:
    """Poll `condition` every `POLL` s; seconds it took, or None after `limit` s."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except psycopg.OperationalError:
            pass
        if time.monotonic() - started > limit:
            return None
        time.sleep(POLL)


def _scalar(dsn: str, statement: sql.Composed, params: list[Any] | None = None) -> Any:
    with psycopg.connect(dsn, autocommit=True, application_name="chaos-test-check") as conn:
        row = conn.execute(statement, params).fetchone()
    assert row is not None
    return row[0]


def _set_up(server: OwnedServer, schema: str) -> str:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE chaos")
    dsn = server.dsn("chaos")
    anyio.run(pgoutbox.Queue(dsn, schema=schema).migrate)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(chaos_app.TABLES)
    return dsn


@dataclass
class Verdict:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, what: str, examples: list[Any]) -> None:
        if examples:
            self.problems.append(f"{what}: {len(examples)} (e.g. {examples[:5]})")


def _rows(conn: psycopg.Connection[Any], statement: sql.Composed) -> list[tuple[Any, ...]]:
    return conn.execute(statement).fetchall()


def _verify(dsn: str, schema: str, chaos: Chaos) -> Verdict:
    v = Verdict()
    producer, faults = chaos.producer, chaos.faults
    with psycopg.connect(dsn, autocommit=True, application_name="chaos-test-check") as conn:
        jobs = {
            r[0]: (r[1], r[2], r[3])
            for r in _rows(conn, _q("SELECT id, task, state::text, attempt FROM {s}.jobs", schema))
        }
        claimed_at: dict[int, float] = {
            r[0]: r[1]
            for r in _rows(
                conn,
                _q(
                    "SELECT id, extract(epoch FROM attempted_at)::float8 FROM {s}.jobs "
                    "WHERE state <> 'completed' AND attempted_at IS NOT NULL",
                    schema,
                ),
            )
        }
        error_of: dict[tuple[int, int], str] = {
            (r[0], r[1]): r[2]
            for r in _rows(
                conn,
                _q(
                    "SELECT j.id, (e->>'attempt')::int, e->>'type' "
                    "FROM {s}.jobs j, unnest(j.errors) WITH ORDINALITY AS x(e, i) ORDER BY j.id, i",
                    schema,
                ),
            )
        }
        runs: dict[str, list[tuple[int, int]]] = {
            table: [
                (r[0], r[1])
                for r in _rows(
                    conn, sql.SQL("SELECT job_id, attempt FROM {}").format(sql.Identifier(table))
                )
            ]
            for table in ("runs_plain", "runs_once", "effects_once")
        }
        for fault in faults:
            first = conn.execute(
                _q(
                    "SELECT extract(epoch FROM min(finished_at))::float8 FROM {s}.jobs "
                    "WHERE finished_at > to_timestamp(%s)",
                    schema,
                ),
                [fault.ended],
            ).fetchone()
            if first is not None and first[0] is not None:
                fault.first_completion = first[0] - fault.ended
        started_by: dict[int, list[float]] = defaultdict(list)
        for pid, at in conn.execute(
            "SELECT pid, extract(epoch FROM at)::float8 FROM runs_plain "
            "UNION ALL SELECT pid, extract(epoch FROM at)::float8 FROM runs_once"
        ):
            started_by[pid].append(at)
    for times in started_by.values():
        times.sort()
    for fault in faults:
        fault.recovery = _recovery(fault, started_by)

    unknown_committed = {i: t for i, t in producer.unknown.items() if i in jobs}
    expected = {**producer.committed, **unknown_committed}
    v.problem("committed jobs lost", sorted(set(producer.committed) - set(jobs)))
    v.problem(
        "committed jobs not completed (id, task, state, attempt, last claimed)",
        [
            (i, *jobs[i], _when(chaos, claimed_at.get(i)))
            for i in sorted(expected)
            if i in jobs and jobs[i][1] != "completed"
        ],
    )
    v.problem("jobs nobody committed", sorted(set(jobs) - set(expected)))
    v.problem(
        f"jobs not terminal {FAULT_DRAIN_LIMIT:.0f} s after a fault (stuck, even if freed later)",
        chaos.stuck_details,
    )
    v.problem("rolled-back jobs that exist", sorted(set(producer.rolled_back) & set(jobs)))
    ran = {job_id for table in runs.values() for job_id, _ in table}
    v.problem("rolled-back jobs that ran", sorted(set(producer.rolled_back) & ran))

    by_kind = {"chaos.plain": "runs_plain", "chaos.exactly_once": "runs_once"}
    duplicates: dict[str, Counter[str]] = {}
    for task, table in by_kind.items():
        mine = {i for i, t in expected.items() if t == task}
        attempts: dict[int, list[int]] = defaultdict(list)
        for job_id, attempt in runs[table]:
            attempts[job_id].append(attempt)
        v.problem(f"{table} rows of jobs that are not {task}", sorted(set(attempts) - mine))
        v.problem(f"{task} jobs that never ran", sorted(mine - set(attempts)))
        v.problem(
            f"{task}: one attempt run twice (job, attempt)",
            sorted({(i, a) for i, runs_ in attempts.items() for a in runs_ if runs_.count(a) > 1}),
        )
        causes: Counter[str] = Counter()
        for job_id in mine & set(attempts):
            final = jobs[job_id][2] if job_id in jobs else -1
            for attempt in attempts[job_id]:
                if attempt != final:
                    causes[error_of.get((job_id, attempt), "released without an error")] += 1
        duplicates[task] = causes
    plain = {i for i, t in expected.items() if t == "chaos.plain"}
    final_runs = set(runs["runs_plain"])
    v.problem(
        "completed plain jobs with no run of their completing attempt",
        sorted(
            i
            for i in plain
            if i in jobs and jobs[i][1] == "completed" and (i, jobs[i][2]) not in final_runs
        ),
    )
    once = {i for i, t in expected.items() if t == "chaos.exactly_once"}
    effects: Counter[int] = Counter(job_id for job_id, _ in runs["effects_once"])
    v.problem(
        "exactly_once jobs whose effect is missing or repeated (id, effects)",
        sorted((i, effects[i]) for i in once if effects[i] != 1),
    )
    v.problem(
        "exactly_once effects of an attempt that did not complete the job (id, attempt)",
        sorted((i, a) for i, a in runs["effects_once"] if i in jobs and jobs[i][2] != a),
    )
    v.problem("effects_once rows of other jobs", sorted(set(effects) - once))

    kinds = Counter(expected.values())
    states = dict(Counter(s for _, s, _ in jobs.values()))
    exist = len(set(producer.rolled_back) & set(jobs))
    absent = len(producer.unknown) - len(unknown_committed)
    needed_more = sum(1 for i in expected if i in jobs and jobs[i][2] > 1)
    plain_extra = sum(duplicates["chaos.plain"].values())
    once_extra = sum(duplicates["chaos.exactly_once"].values())
    repeated_effects = sum(max(0, c - 1) for c in effects.values())
    v.lines += [
        (
            f"jobs committed          {len(expected)}: plain {kinds['chaos.plain']}, "
            f"exactly_once {kinds['chaos.exactly_once']} (states now: {states})"
        ),
        f"rolled back             {len(producer.rolled_back)} (exist: {exist})",
        (
            f"unknown commits         {len(producer.unknown)} "
            f"(committed: {len(unknown_committed)}, absent: {absent})"
        ),
        (
            f"failed before commit    {producer.failed_before_commit} "
            f"(+ {producer.connect_failures} failed connects)"
        ),
        f"jobs needing >1 attempt {needed_more}",
        (
            f"plain duplicates        {plain_extra} runs beyond one"
            f"{_causes(duplicates['chaos.plain'])}"
        ),
        (
            f"exactly_once reruns     {once_extra} executions beyond one, effects rolled back"
            f"{_causes(duplicates['chaos.exactly_once'])}"
        ),
        f"exactly_once duplicates {repeated_effects} effects beyond one (must be 0)",
    ]
    return v


def _when(chaos: Chaos, wall: float | None) -> str:
    """A wall-clock time as seconds into the chaos phase, with the fault just before it."""
    if wall is None:
        return "never"
    at = wall - chaos.started_wall
    before = [(n, f) for n, f in enumerate(chaos.faults, 1) if f.wall <= wall]
    if not before:
        return f"at {at:.2f} s, before any fault"
    n, fault = before[-1]
    return f"at {at:.2f} s, {wall - fault.wall:.2f} s after fault #{n} ({fault.kind})"


def _recovery(fault: Fault, started_by: dict[int, list[float]]) -> float | None:
    """Seconds after `fault` ended until each affected worker started a job (the slowest)."""
    slowest = 0.0
    for pid in fault.affected:
        times = started_by.get(pid, [])
        after = bisect.bisect_right(times, fault.ended)
        if after == len(times):
            return None  # never ran a job again (e.g. killed by a later fault first)
        slowest = max(slowest, times[after] - fault.ended)
    return slowest


def _causes(causes: Counter[str]) -> str:
    if not causes:
        return ""
    return " — by cause of the rerun: " + ", ".join(f"{k} {n}" for k, n in causes.most_common())


LOG_EVENTS: Final = (
    "worker.declared_dead",
    "worker.rescued",
    "job.outcome_fenced",
    "job.lost",
    "job.retrying",
    "job.interrupted",
    "worker.connection_failed",
    "listener.unavailable",
    "connection.cancel_failed",
    "connection.cancel_timeout",
    "worker.unregister_failed",
    "jobs.vacuumed",
    "jobs.vacuum_skipped",
    "jobs.vacuum_failed",
    "jobs.vacuum_check_failed",
)


def _log_events(fleet: Fleet) -> str:
    counts: Counter[str] = Counter()
    rescued = 0
    for worker in fleet.history:
        for line in worker.log.read_text(errors="replace").splitlines():
            for event in LOG_EVENTS:
                if f"[{event}]" in line:
                    counts[event] += 1
                    if event == "worker.rescued":
                        rescued += int(line.split("rescued ", 1)[1].split(" ", 1)[0])
    shown = ", ".join(f"{e} {counts[e]}" for e in LOG_EVENTS if counts[e])
    return f"worker log events       {shown or 'none'} (jobs rescued: {rescued})"


def _seconds(values: list[float | None]) -> str:
    done = [v for v in values if v is not None]
    text = f"{min(done):5.2f} {statistics.median(done):5.2f} {max(done):5.2f}" if done else "-"
    missing = len(values) - len(done)
    return text + (f" +{missing} n/a" if missing else "")


def _one(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else "   n/a"


def _report(chaos: Chaos, verdict: Verdict, final_drain: float | None, took: float) -> str:
    fleet, faults = chaos.fleet, chaos.faults
    counts = Counter(f.kind for f in faults)
    blackholes = ", ".join(f"{s:.1f} s" for s in chaos.blackhole_seconds)
    restarts = ", ".join(
        f"{m} {s:.1f} s" for m, s in zip(chaos.restart_modes, chaos.restart_seconds, strict=True)
    )
    drained = f"{final_drain:.2f} s" if final_drain is not None else "NOT DRAINED"
    lines = [
        (
            f"pgoutbox chaos run: seed {SEED}, {SECONDS:.0f} s of faults (took {took:.1f} s), "
            f"{WORKERS} workers (slot {PROXIED_SLOT} via the proxy), producer {RATE:.0f} jobs/s, "
            f"{chaos.server.version()}"
        ),
        *verdict.lines,
        (
            f"faults                  kills {fleet.kills}, backend terminations "
            f"{counts['terminate']} ({chaos.terminated_backends} backends), blackholes "
            f"{counts['blackhole']} ({blackholes}), restarts {chaos.server.restarts} ({restarts})"
        ),
        (
            f"proxy                   {chaos.proxy.accepted} connections, "
            f"{chaos.proxy.refused} refused upstream"
        ),
        _log_events(fleet),
        (
            f"stuck after a fault     {len(chaos.stuck)} jobs not terminal "
            f"{FAULT_DRAIN_LIMIT:.0f} s after a fault: {sorted(chaos.stuck)[:10]}"
        ),
        (
            f"final drain             {drained} after the last fault; workers: "
            f"{len(fleet.history)} processes, {len(fleet.unexpected)} exited unexpectedly"
        ),
        "",
        "Seconds after each fault (min median max; n/a: never, or not within the limit):",
        "  drain     from injection until every job committed before the fault was terminal",
        "  first     from the fault's end until the first job finished after it",
        "  recovery  from the fault's end until each affected worker started a job again",
        "            (kill: the replacement; blackhole: the proxied worker; others: all)",
        f"  {'kind':<10} {'n':>2}  {'drain':<17}  {'first':<17}  {'recovery':<17}  in flight",
    ]
    for kind in ("kill", "terminate", "blackhole", "restart"):
        mine = [f for f in faults if f.kind == kind]
        lines.append(
            f"  {kind:<10} {len(mine):>2}  {_seconds([f.drain for f in mine]):<17}  "
            f"{_seconds([f.first_completion for f in mine]):<17}  "
            f"{_seconds([f.recovery for f in mine]):<17}  {sum(f.in_flight for f in mine)}"
        )
    lines += ["", "  #   at(s)  kind        drain   first  recovery  in flight  detail"]
    lines += [
        f"  {i:<3} {f.at:5.1f}  {f.kind:<10} {_one(f.drain)}  {_one(f.first_completion)}  "
        f"{_one(f.recovery):>8}  {f.in_flight:>9}  {f.detail}"
        for i, f in enumerate(faults, 1)
    ]
    lines += ["", "  workers: " + "; ".join(
        f"{w.slot}.{w.incarnation} {w.backend} pid {w.process.pid}: {w.how_ended}"
        for w in fleet.history
    )]  # fmt: skip
    if verdict.problems:
        lines += ["", "PROBLEMS:", *(f"  - {p}" for p in verdict.problems)]
    return "\n".join(lines)


def _log_tails(fleet: Fleet, server: OwnedServer, lines: int = 15) -> str:
    parts = []
    for worker in fleet.history:
        text = worker.log.read_text(errors="replace").splitlines()
        notable = [ln for ln in text if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
        parts.append(f"--- {worker.log.name} ({worker.how_ended})\n" + "\n".join(notable[-lines:]))
    parts.append(f"--- server log\n{server.log_tail(lines)}")
    return "\n".join(parts)


@contextlib.contextmanager
def _kept_logs(fleet: Fleet, server: OwnedServer) -> Iterator[None]:
    try:
        yield
    finally:
        keep = os.environ.get(LOGS_ENV)
        if keep:
            target = Path(keep) / f"chaos-{SEED}-{int(time.time())}"
            shutil.copytree(fleet.logs, target)
            shutil.copy(server.log, target / "server.log")


def test_chaos_jobs_survive_kills_terminations_blackholes_and_restarts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = random.Random(SEED)
    schema = chaos_app.queue.schema
    begun = time.monotonic()
    with contextlib.ExitStack() as stack:
        emergency = stack.enter_context(EmergencyStop())
        try:
            server = stack.enter_context(owned_server(emergency))
        except ServerUnavailableError as ex:
            # No skip: a chaos test that silently does not run proves nothing.
            pytest.fail(f"cannot own a PostgreSQL server for the chaos test: {ex}")
        dsn = _set_up(server, schema)
        proxy = stack.enter_context(Proxy("127.0.0.1", server.port))
        logs = server.base / "logs"
        logs.mkdir()
        fleet = Fleet(
            logs, direct_dsn=dsn, proxy_dsn=server.dsn("chaos", port=proxy.port), schema=schema
        )
        emergency.push(fleet.kill_all)
        stack.callback(emergency.discard, fleet.kill_all)
        stack.callback(fleet.kill_all)
        stack.enter_context(_kept_logs(fleet, server))
        for slot in range(WORKERS):
            fleet.spawn(slot)
        registered = _wait_until(
            lambda: _scalar(dsn, _q("SELECT count(*) FROM {s}.workers", schema)) >= WORKERS, 30
        )
        assert registered is not None, _log_tails(fleet, server)

        chaos = Chaos(server, proxy, fleet, Admin(dsn), Producer(dsn, rng), schema, rng)
        anyio.run(chaos.run)
        final_drain = _wait_until(
            lambda: (
                _scalar(
                    dsn,
                    _q(
                        "SELECT count(*) FROM {s}.jobs "
                        "WHERE state NOT IN ('completed', 'failed', 'cancelled')",
                        schema,
                    ),
                )
                == 0
            ),
            FINAL_DRAIN_LIMIT,
        )
        fleet.stop(STOP_LIMIT)
        verdict = _verify(dsn, schema, chaos)
        for worker in fleet.history:
            if worker.how_ended.startswith(("exited", "did not stop")) or (
                worker.how_ended.startswith("SIGTERM") and not worker.how_ended.endswith(" 0")
            ):
                verdict.problems.append(f"worker {worker.log.name}: {worker.how_ended}")
        report = _report(chaos, verdict, final_drain, time.monotonic() - begun)
        with capsys.disabled():
            print("\n" + report)  # noqa: T201 (the run's summary is the point)
        if os.environ.get(REPORT_ENV):
            Path(os.environ[REPORT_ENV]).write_text(report + "\n")
        assert not verdict.problems, report + "\n\n" + _log_tails(fleet, server)
