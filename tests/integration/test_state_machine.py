"""The job state machine, driven through the real SQL with a Python model beside it.

A hypothesis `RuleBasedStateMachine` enqueues jobs, claims them for simulated
workers, writes their outcomes (current and stale, in batches), completes them
in a fenced transaction, cancels them, gives back fetches whose reply was lost,
and registers, beats, expires, rescues and deletes workers, all through
`pgoutbox._store` on a migrated schema. After every step it compares each row
with the model and checks the invariants:

* the jobs and workers in the database are exactly the model's; each job's
  state, attempt, max_attempts, cancel request, error count, claim and
  due-ness match;
* ``attempt`` counts the claims not given back and never exceeds
  ``max_attempts``, which grows only by snoozes and by attempts a worker gave
  back when it let the job go;
* a running job has its worker's id, any other job has none; a job has
  ``finished_at`` exactly when it is completed, failed or cancelled;
* a fenced write (stale attempt, or a job that is not running) changes no row;
* a finished job's row never changes again;
* a fetch makes due delayed jobs available (at most its limit per queue and
  task, oldest first), then claims exactly the available jobs the fetch order
  picks, never a job someone holds.

`test_concurrent_claims_never_share_a_job` claims from several sessions at
once (kept out of the machine: which worker wins a job is up to timing).

The rules are sync and the store is async: each test runs the machine from a
blocking portal on one backend (asyncio, trio) with its own schema, emptied
before every example.
"""

from __future__ import annotations

import secrets
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, LiteralString, TypeVar

import anyio
import msgspec
import pytest
from anyio.from_thread import BlockingPortal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

import pgoutbox
from pgoutbox import JobState, _store
from pgoutbox._job import ClaimedJob, JobError, JobSpec, Outcome
from pgoutbox._sql import Statements
from pgoutbox.worker._executor import interrupted

from ._running import until_waiting_for_a_lock

T = TypeVar("T")

QUEUES: Final = ("q1", "q2")
TASKS: Final = ("t1", "t2")
WORKERS: Final = tuple(str(uuid.UUID(int=n)) for n in (1, 2, 3))
RUNS: Final = {
    WORKERS[0]: (("q1",), TASKS),
    WORKERS[1]: (QUEUES, ("t1",)),
    WORKERS[2]: (QUEUES, ("t1",)),
}
"""The queues and tasks each worker registers: only the first runs t2, and only in q1."""
HEARTBEAT_TIMEOUT: Final = 60.0
"""Small next to the hour a simulated death moves the heartbeat back; large next to a test run."""
QUICK_HEARTBEAT_TIMEOUT: Final = 0.01
"""For the single-path tests, which must rescue even on a server started a moment ago."""
LATER: Final = 3600.0
"""A delay that never comes due during a test."""
UNKNOWN_ID: Final = 10**12
"""A job id no example reaches."""
CANCEL_PAYLOAD: Final = "!cancel"

WAITING: Final = frozenset({JobState.SCHEDULED, JobState.AVAILABLE, JobState.RETRYABLE})
DELAYED: Final = frozenset({JobState.SCHEDULED, JobState.RETRYABLE})
"""Waiting states a fetch makes `available` once due, before it claims."""
FINAL: Final = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
OUTCOME_KINDS: Final = ("complete", "fail", "retry", "snooze", "cancel", "interrupt")
OUTCOME_STATES: Final = (
    JobState.COMPLETED,
    JobState.FAILED,
    JobState.RETRYABLE,
    JobState.SCHEDULED,
    JobState.CANCELLED,
    JobState.AVAILABLE,
)

SETTINGS: Final = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,  # examples live in the PostgreSQL schema, not worth replaying from disk
    suppress_health_check=[HealthCheck.too_slow],
)

_JOB_BATCH: Final = st.lists(
    st.tuples(
        st.sampled_from(QUEUES),
        st.sampled_from(TASKS),
        st.integers(-2, 2),  # priority
        st.integers(1, 3),  # max_attempts
        st.booleans(),  # delayed past the test
    ),
    min_size=1,
    max_size=4,
)

_JOB_ROWS: Final = """
    SELECT id, queue, task, priority, state::text, attempt, max_attempts, worker_id::text,
           cancel_requested_at IS NOT NULL, finished_at IS NOT NULL, cardinality(errors),
           run_at <= now(), to_jsonb(j)::text, claim_id::text
    FROM {schema}.jobs AS j
    ORDER BY id
"""

_WORKER_ROWS: Final = """
    SELECT id::text, heartbeat_at < now() - heartbeat_timeout * interval '1 second'
    FROM {schema}.workers
"""


# -- the database, reached from sync code through a portal ---------------------


async def _fetch(
    conn: pgoutbox.Connection[Any], schema: str, query: LiteralString, params: Sequence[object]
) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql.SQL(query).format(schema=sql.Identifier(schema)), params)
    return list(await cur.fetchall()) if cur.description is not None else []


@dataclass(frozen=True)
class _Db:
    """A migrated schema and an autocommit session per worker, driven through `portal`."""

    portal: BlockingPortal
    schema: str
    statements: Statements
    sessions: tuple[pgoutbox.Connection[Any], ...]  # one per worker, for concurrent claims

    @property
    def conn(self) -> pgoutbox.Connection[Any]:
        return self.sessions[0]

    @property
    def channel(self) -> str:
        return f"{self.schema}_jobs"

    def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        return self.portal.call(partial(fn, *args, **kwargs))

    def rows(self, query: LiteralString, *params: object) -> list[tuple[Any, ...]]:
        """Run a test-owned statement ({schema} is the quoted schema) and return its rows."""
        return self.call(_fetch, self.conn, self.schema, query, params)

    def observed(
        self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
    ) -> tuple[dict[int, str], T, dict[int, str]]:
        """Every job row before, `fn`'s result, every job row after (one portal trip)."""
        return self.call(_observed, self, partial(fn, self.conn, self.statements, *args, **kwargs))

    def state(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The job rows (`_JOB_ROWS`) and the workers with whether each has expired."""
        return self.call(_state, self)


async def _row_texts(db: _Db) -> dict[int, str]:
    rows = await _fetch(
        db.conn, db.schema, "SELECT id, to_jsonb(j)::text FROM {schema}.jobs AS j", ()
    )
    return {row[0]: row[1] for row in rows}


async def _observed(
    db: _Db, fn: Callable[[], Awaitable[T]]
) -> tuple[dict[int, str], T, dict[int, str]]:
    before = await _row_texts(db)
    result = await fn()
    return before, result, await _row_texts(db)


async def _state(db: _Db) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    jobs = await _fetch(db.conn, db.schema, _JOB_ROWS, ())
    workers = await _fetch(db.conn, db.schema, _WORKER_ROWS, ())
    return jobs, workers


async def _open(portal: BlockingPortal, dsn: str) -> _Db:
    schema = f"sm_{secrets.token_hex(6)}"
    queue = pgoutbox.Queue(dsn, schema=schema)
    try:
        await queue.migrate()
    finally:
        await queue.aclose()
    sessions = [await pgoutbox.connect(dsn, autocommit=True) for _ in WORKERS]
    return _Db(portal, schema, queue.statements, tuple(sessions))


async def _close(db: _Db) -> None:
    try:
        await db.conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(db.schema))
        )
    finally:
        for session in db.sessions:
            await session.close()


async def _claimed(*args: Any, **kwargs: Any) -> list[ClaimedJob]:
    """The jobs `_store.job_claim` claims (no completions ride along)."""
    claimed, _, _ = await _store.job_claim(*args, **kwargs)
    return claimed


CONCURRENT_TASKS: Final = (TASKS, ("t1",), ("t2",))
"""The tasks each concurrent claimer fetches: with no worker registered, the second and
third set aside each other's jobs, and every claimer makes them available again."""


async def _claim_concurrently(db: _Db, limits: Sequence[int]) -> list[list[ClaimedJob]]:
    """Workers claim at the same time, each on its own session, until one finds nothing."""
    claimed: list[list[ClaimedJob]] = [[] for _ in limits]

    async def work(i: int) -> None:
        while batch := await _claimed(
            db.sessions[i],
            db.statements,
            queues=QUEUES,
            tasks=CONCURRENT_TASKS[i],
            limit=limits[i],
            worker_id=WORKERS[i],
            claim_id=str(uuid.uuid4()),
        ):
            claimed[i].extend(batch)

    async with anyio.create_task_group() as tg:
        for i in range(len(limits)):
            tg.start_soon(work, i)
    return claimed


@pytest.fixture(scope="module")
def db(blocking_portal: BlockingPortal, database_dsn: str) -> Iterator[_Db]:
    """A migrated schema for this module on one backend, dropped at the end."""
    opened = blocking_portal.call(_open, blocking_portal, database_dsn)
    try:
        yield opened
    finally:
        blocking_portal.call(_close, opened)


# -- the model -----------------------------------------------------------------


@dataclass
class _Job:
    """What one job's row should hold."""

    id: int
    queue: str
    task: str
    priority: int
    max_attempts: int
    state: JobState
    due: bool  # run_at has passed (meaningful while waiting)
    initial_max_attempts: int
    attempt: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    errors: int = 0
    snoozes: int = 0
    claim: str | None = None  # the claim_id of the fetch that holds it
    # Attempts given back: a worker let the job go (worker_delete, interrupted).
    returns: int = 0


def _error(attempt: int, message: str) -> str:
    record = JobError(attempt=attempt, at=datetime.now(UTC), type="test.Error", message=message)
    return msgspec.json.encode(record).decode()


class JobStateMachine(RuleBasedStateMachine):
    """Drives `pgoutbox._store` on `db` and checks every row against a model."""

    def __init__(self, db: _Db) -> None:
        super().__init__()
        self.db = db
        db.rows("DELETE FROM {schema}.jobs; DELETE FROM {schema}.workers")
        self.jobs: dict[int, _Job] = {}
        self.registered: set[str] = set()
        self.expired: set[str] = set()
        self.final_rows: dict[int, str] = {}
        self.claims: list[tuple[str, str]] = []  # (worker, claim_id) of every fetch that got jobs
        self.fetches = 0

    # -- helpers ---------------------------------------------------------------

    def _running(self) -> list[int]:
        return sorted(j.id for j in self.jobs.values() if j.state is JobState.RUNNING)

    def _stale_writes(self) -> list[tuple[int, int]]:
        """(job, attempt) pairs an outcome write must be fenced off for."""
        return [
            (j.id, attempt)
            for j in self.jobs.values()
            for attempt in range(j.attempt + 2)
            if not (j.state is JobState.RUNNING and attempt == j.attempt)
        ]

    def _stale(self) -> st.SearchStrategy[tuple[int, int]]:
        """A stale (job, attempt), half the time one next to a running attempt."""
        anywhere = st.sampled_from(self._stale_writes())
        beside = [
            (j.id, attempt)
            for j in self.jobs.values()
            if j.state is JobState.RUNNING
            for attempt in (j.attempt - 1, j.attempt + 1)
        ]
        return st.one_of(st.sampled_from(beside), anywhere) if beside else anywhere

    def _worker(self) -> st.SearchStrategy[str]:
        """A worker, half the time one that holds a job."""
        holders = sorted({j.worker for j in self.jobs.values() if j.worker is not None})
        anyone = st.sampled_from(WORKERS)
        return st.one_of(st.sampled_from(holders), anyone) if holders else anyone

    def _register(self, worker: str) -> None:
        self.db.call(
            _store.worker_register,
            self.db.conn,
            self.db.statements,
            worker_id=worker,
            hostname="state-machine",
            pid=1,
            queues=RUNS[worker][0],
            tasks=RUNS[worker][1],
            concurrency=4,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
        )
        self.registered.add(worker)
        self.expired.discard(worker)

    def _add(self, job_id: int, spec: JobSpec, state: JobState, *, due: bool) -> None:
        assert job_id not in self.jobs, f"job id {job_id} handed out twice"
        assert all(job_id > known for known in self.jobs), "job ids must grow"
        self.jobs[job_id] = _Job(
            id=job_id,
            queue=spec.queue,
            task=spec.task,
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            initial_max_attempts=spec.max_attempts,
            state=state,
            due=due,
        )

    def _claimed(self, claimed: ClaimedJob, worker: str, claim_id: str) -> None:
        job = self.jobs[claimed.id]
        assert job.state in WAITING, f"claimed job {job.id} in state {job.state} ({job.worker})"
        assert job.due, f"claimed job {job.id} before it was due"
        assert (claimed.queue, claimed.task, claimed.priority) == (
            job.queue,
            job.task,
            job.priority,
        )
        assert (claimed.attempt, claimed.max_attempts) == (job.attempt + 1, job.max_attempts)
        assert claimed.attempt <= claimed.max_attempts, f"job {job.id} claimed past its attempts"
        job.state, job.attempt, job.worker = JobState.RUNNING, claimed.attempt, worker
        job.claim = claim_id

    def _returned(self, job: _Job) -> None:
        """A worker lets a running job go: its attempt is given back and it waits again,
        or, if its cancel was requested, it ends cancelled."""
        job.worker = None
        job.max_attempts += 1
        job.returns += 1
        if job.cancel_requested:
            job.state, job.cancel_requested = JobState.CANCELLED, False
        else:
            job.state, job.due = JobState.AVAILABLE, True

    # -- rules -----------------------------------------------------------------

    @initialize()
    def register_workers(self) -> None:
        for worker in WORKERS:
            self._register(worker)

    @initialize(jobs=_JOB_BATCH)
    def seed_jobs(self, jobs: list[tuple[str, str, int, int, bool]]) -> None:
        self.enqueue_many(jobs)

    @rule(
        queue=st.sampled_from(QUEUES),
        task=st.sampled_from(TASKS),
        priority=st.integers(-2, 2),
        max_attempts=st.integers(1, 3),
        timing=st.sampled_from(["notify", "now", "past", "later"]),
    )
    def enqueue(self, queue: str, task: str, priority: int, max_attempts: int, timing: str) -> None:
        run_at = datetime.now(UTC) - timedelta(minutes=1) if timing == "past" else None
        spec = JobSpec(
            task=task,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            args="{}",
            delay=LATER if timing == "later" else 0.0,
            run_at=run_at,
        )
        channel = self.db.channel if timing == "notify" else None
        job_id, _, _ = self.db.call(
            _store.job_insert, self.db.conn, self.db.statements, spec, channel=channel
        )
        due = timing != "later"
        self._add(job_id, spec, JobState.AVAILABLE if due else JobState.SCHEDULED, due=due)

    @rule(jobs=_JOB_BATCH)
    def enqueue_many(self, jobs: list[tuple[str, str, int, int, bool]]) -> None:
        specs = [
            JobSpec(
                task=task,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                args="{}",
                delay=LATER if later else 0.0,
            )
            for queue, task, priority, max_attempts, later in jobs
        ]
        rows = self.db.call(
            _store.job_insert_many, self.db.conn, self.db.statements, specs, channel=self.db.channel
        )
        assert len(rows) == len(specs)
        for (job_id, _, _), spec in zip(rows, specs, strict=True):
            due = spec.delay == 0
            self._add(job_id, spec, JobState.AVAILABLE if due else JobState.SCHEDULED, due=due)

    @rule(
        worker=st.sampled_from(WORKERS),
        queues=st.lists(st.sampled_from(QUEUES), min_size=1, unique=True),
        tasks=st.lists(st.sampled_from(TASKS), min_size=1, unique=True),
        limit=st.integers(1, 4),
    )
    def claim(self, worker: str, queues: list[str], tasks: list[str], limit: int) -> None:
        """Claim as a worker would: exactly the first `limit` due jobs in fetch order."""
        self._fetch(worker, queues, tasks, limit)

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 4), data=st.data())
    def work(self, worker: str, limit: int, data: st.DataObject) -> None:
        """A worker's round: fetch from every queue, then report on some of what it got."""
        fetched = self._fetch(worker, list(QUEUES), list(TASKS), limit)
        if fetched:
            done = data.draw(st.lists(st.sampled_from(fetched), unique=True), label="finished")
            if done:
                self._write_outcomes(data, done)

    def _fetch(self, worker: str, queues: list[str], tasks: list[str], limit: int) -> list[int]:
        """Claim through job_claim, check the result, return the ids claimed."""
        run_at = dict(self.db.rows("SELECT id, run_at FROM {schema}.jobs"))
        # The fetch first makes the due delayed jobs of each of its (queue,
        # task) pairs available: at most `limit` per pair, oldest first.
        for queue in queues:
            for task in tasks:
                delayed = sorted(
                    (
                        j
                        for j in self.jobs.values()
                        if j.state in DELAYED and j.due and (j.queue, j.task) == (queue, task)
                    ),
                    key=lambda j: (run_at[j.id], j.id),
                )
                for j in delayed[:limit]:
                    j.state = JobState.AVAILABLE

        # Then it locks the first `limit` jobs of each queue in fetch order that
        # are of its tasks, or of a task that no registered worker sharing a
        # queue with the fetch runs. It claims the best `limit` of the first,
        # and sets the others aside as `scheduled`, still due.
        def order(j: _Job) -> tuple[int, datetime, int]:
            return (-j.priority, run_at[j.id], j.id)

        run = {
            task for w in self.registered if set(RUNS[w][0]) & set(queues) for task in RUNS[w][1]
        }
        heads = [
            sorted(
                (
                    j
                    for j in self.jobs.values()
                    if j.state is JobState.AVAILABLE
                    and j.due
                    and j.queue == queue
                    and (j.task in tasks or j.task not in run)
                ),
                key=order,
            )[:limit]
            for queue in queues
        ]
        mine = sorted((j for head in heads for j in head if j.task in tasks), key=order)
        unrun = [j for head in heads for j in head if j.task not in tasks]
        for j in unrun:
            j.state = JobState.SCHEDULED
        if unrun:  # then up to 1,000 more per queue: here, all of them
            for j in self.jobs.values():
                if (
                    j.state is JobState.AVAILABLE
                    and j.due
                    and j.queue in queues
                    and j.task not in tasks
                    and j.task not in run
                ):
                    j.state = JobState.SCHEDULED
        expected = {j.id for j in mine[:limit]}
        claim_id = str(uuid.UUID(int=2**64 + self.fetches))
        self.fetches += 1
        claimed = self.db.call(
            _claimed,
            self.db.conn,
            self.db.statements,
            queues=queues,
            tasks=tasks,
            limit=limit,
            worker_id=worker,
            claim_id=claim_id,
        )
        assert len(claimed) == len({c.id for c in claimed}), "a job claimed twice in one fetch"
        assert {c.id for c in claimed} == expected
        for c in claimed:
            self._claimed(c, worker, claim_id)
        if claimed:
            self.claims.append((worker, claim_id))
        return sorted(c.id for c in claimed)

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), other_worker=st.booleans())
    def release_claim(self, data: st.DataObject, other_worker: bool) -> None:
        """A fetch whose reply was lost: its still-running jobs go back, attempt and all."""
        holding = sorted({(j.worker, j.claim) for j in self.jobs.values() if j.worker and j.claim})
        any_claim = st.sampled_from(self.claims)
        worker, claim_id = data.draw(
            st.one_of(st.sampled_from(holding), any_claim) if holding else any_claim,
            label="claim",
        )
        if other_worker:  # only the claiming worker's jobs may go back
            worker = WORKERS[(WORKERS.index(worker) + 1) % len(WORKERS)]
        held = [
            j
            for j in self.jobs.values()
            if j.state is JobState.RUNNING and j.worker == worker and j.claim == claim_id
        ]
        released = self.db.call(
            _store.job_release_claim,
            self.db.conn,
            self.db.statements,
            worker_id=worker,
            claim_id=claim_id,
        )
        assert released == len(held)
        for job in held:
            job.worker, job.claim = None, None
            job.attempt -= 1
            if job.cancel_requested:
                job.state, job.cancel_requested = JobState.CANCELLED, False
            else:
                job.state, job.due = JobState.AVAILABLE, True

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def write_outcomes(self, data: st.DataObject) -> None:
        """A batch of current outcomes, possibly mixed with stale ones that must lose."""
        running = st.sampled_from(self._running())
        asked = [
            j.id for j in self.jobs.values() if j.state is JobState.RUNNING and j.cancel_requested
        ]
        pick = st.one_of(st.sampled_from(asked), running) if asked else running
        chosen = data.draw(st.lists(pick, min_size=1, max_size=3, unique=True), label="jobs")
        self._write_outcomes(data, chosen)

    def _write_outcomes(self, data: st.DataObject, chosen: list[int]) -> None:  # noqa: PLR0912
        """Write an outcome for each of `chosen` (running), with stale ones mixed in."""
        current: list[Outcome] = []
        for job_id in chosen:
            job = self.jobs[job_id]
            kind = data.draw(st.sampled_from(OUTCOME_KINDS), label=f"outcome of job {job_id}")
            if kind == "complete":
                current.append(Outcome(job_id, job.attempt, JobState.COMPLETED))
            elif kind == "fail" or (kind == "retry" and job.attempt >= job.max_attempts):
                # The executor fails a job that has no attempt left instead of retrying it.
                current.append(
                    Outcome(job_id, job.attempt, JobState.FAILED, error=_error(job.attempt, kind))
                )
            elif kind == "retry":
                error = _error(job.attempt, "retry")
                current.append(Outcome(job_id, job.attempt, JobState.RETRYABLE, 0.0, error))
            elif kind == "snooze":
                delay = data.draw(st.sampled_from([0.0, LATER]), label="snooze")
                current.append(
                    Outcome(job_id, job.attempt, JobState.SCHEDULED, delay, extra_attempts=1)
                )
            elif kind == "cancel":
                current.append(Outcome(job_id, job.attempt, JobState.CANCELLED))
            else:  # interrupted by a shutdown: back to the queue at once, attempt given back
                error = _error(job.attempt, "interrupted")
                current.append(
                    Outcome(job_id, job.attempt, JobState.AVAILABLE, 0.0, error, extra_attempts=1)
                )
        stale = [
            Outcome(job_id, attempt, state, error=_error(attempt, "stale"))
            for (job_id, attempt), state in data.draw(
                st.lists(
                    st.tuples(self._stale(), st.sampled_from(OUTCOME_STATES)),
                    max_size=2,
                ),
                label="stale outcomes",
            )
        ]
        batch = data.draw(st.permutations(current + stale), label="batch")
        untouched = {o.id for o in stale} - set(chosen)
        before, written, after = self.db.observed(_store.job_set_outcome_many, batch)
        assert written == {(o.id, o.attempt) for o in current}, (
            "exactly the current attempts' outcomes are written"
        )
        for job_id in untouched:
            assert after[job_id] == before[job_id], f"stale outcome changed job {job_id}"
        for outcome in current:
            job = self.jobs[outcome.id]
            if outcome.error is not None:
                job.errors += 1
            if outcome.state is JobState.AVAILABLE:
                self._returned(job)
                continue
            job.worker = None
            job.max_attempts += outcome.extra_attempts
            job.snoozes += outcome.extra_attempts
            if job.cancel_requested and outcome.state in WAITING:
                job.state = JobState.CANCELLED  # a requested cancel wins over waiting again
            else:
                job.state = outcome.state
                job.due = outcome.delay == 0
            job.cancel_requested = False

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), state=st.sampled_from(OUTCOME_STATES), snooze=st.booleans())
    def write_stale_outcome(self, data: st.DataObject, state: JobState, snooze: bool) -> None:
        """An outcome for an attempt that is over (or a job that is not running) is a no-op."""
        job_id, attempt = data.draw(self._stale(), label="stale write")
        outcome = Outcome(
            job_id,
            attempt,
            state,
            delay=0.0 if state in WAITING else None,
            error=_error(attempt, "stale"),
            extra_attempts=int(snooze),
        )
        before, written, after = self.db.observed(_store.job_set_outcome_many, [outcome])
        assert written == set()
        assert after == before, "a fenced outcome write changed a row"

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def complete_fenced(self, data: st.DataObject) -> None:
        """The transactional completion is fenced by attempt like outcome writes."""
        live_writes = [(j.id, j.attempt) for j in self.jobs.values() if j.state is JobState.RUNNING]
        stale = self._stale()
        job_id, attempt = data.draw(
            st.one_of(st.sampled_from(live_writes), stale) if live_writes else stale,
            label="job, attempt",
        )
        job = self.jobs[job_id]
        live = job.state is JobState.RUNNING and attempt == job.attempt
        before, done, after = self.db.observed(
            _store.job_complete_fenced, job_id=job.id, attempt=attempt
        )
        assert done == live
        if live:
            job.state, job.worker, job.cancel_requested = JobState.COMPLETED, None, False
        else:
            assert after == before, "a fenced completion changed a row"

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def queue_cancel(self, data: st.DataObject) -> None:
        """As `Queue.cancel`: cancel the waiting jobs, and ask for the running ones."""
        anywhere = st.sampled_from([*sorted(self.jobs), UNKNOWN_ID])
        running = self._running()
        pick = st.one_of(st.sampled_from(running), anywhere) if running else anywhere
        ids = data.draw(st.lists(pick, min_size=1, max_size=3, unique=True), label="ids")
        waiting = sorted(i for i in ids if i in self.jobs and self.jobs[i].state in WAITING)
        flagged = sorted(
            i for i in ids if i in self.jobs and self.jobs[i].state is JobState.RUNNING
        )
        cancelled, requested = self.db.call(
            _store.job_cancel,
            self.db.conn,
            self.db.statements,
            job_ids=ids,
            channel=self.db.channel,
            payload=CANCEL_PAYLOAD,
        )
        assert (cancelled, requested) == (waiting, flagged)
        for job_id in cancelled:
            self.jobs[job_id].state = JobState.CANCELLED
        for job_id in requested:
            self.jobs[job_id].cancel_requested = True

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        """As the worker's heartbeat: beat, learn what to cancel, register again if gone."""
        alive, to_cancel = self.db.call(
            _store.worker_heartbeat, self.db.conn, self.db.statements, worker_id=worker
        )
        assert alive == (worker in self.registered)
        assert sorted(to_cancel) == sorted(
            j.id
            for j in self.jobs.values()
            if j.state is JobState.RUNNING and j.worker == worker and j.cancel_requested
        )
        if alive:
            # Alive again: the long timeout back (see `expire`).
            self.db.rows(
                "UPDATE {schema}.workers SET heartbeat_timeout = %s WHERE id = %s",
                HEARTBEAT_TIMEOUT,
                worker,
            )
            self.expired.discard(worker)
        else:
            self._register(worker)

    @rule(worker=st.sampled_from(WORKERS))
    def expire(self, worker: str) -> None:
        """The worker stops beating: its heartbeat is now an hour old.

        Its timeout becomes tiny too. Rescue waits a worker's full timeout after
        the server started, and with the long one, whether a freshly started
        server (an embedded one) is past that wait would change with the clock
        in the middle of a run, and the same steps would go two ways, which
        Hypothesis cannot replay. That wait has a test of its own.
        """
        self.db.rows(
            "UPDATE {schema}.workers SET heartbeat_at = now() - interval '1 hour',"
            " heartbeat_timeout = %s WHERE id = %s",
            QUICK_HEARTBEAT_TIMEOUT,
            worker,
        )
        if worker in self.registered:
            self.expired.add(worker)

    @rule(data=st.data())
    def rescue(self, data: st.DataObject) -> None:
        """Maintenance removes expired workers (`dying` expires first) and rescues jobs."""
        dying = data.draw(st.none() | self._worker(), label="dying")
        if dying is not None:
            self.expire(dying)
        # After a server restart nobody could beat: rescue waits a full timeout
        # (the tiny one of expired workers: over at once).
        young = self.db.rows(
            "SELECT pg_postmaster_start_time() >= now() - %s * interval '1 second'",
            QUICK_HEARTBEAT_TIMEOUT,
        )[0][0]
        dead = set() if young else self.registered & self.expired
        orphans = [
            j
            for j in self.jobs.values()
            if j.state is JobState.RUNNING and (j.worker in dead or j.worker not in self.registered)
        ]
        removed, rescued = self.db.call(
            _store.worker_rescue_expired,
            self.db.conn,
            self.db.statements,
            schema=self.db.schema,
            channel=self.db.channel,
        )
        assert (removed, rescued) == (len(dead), len(orphans))
        self.registered -= dead
        self.expired -= dead
        for job in orphans:
            job.worker = None
            job.errors += 1
            if job.cancel_requested:
                job.state = JobState.CANCELLED
            elif job.attempt >= job.max_attempts:
                job.state = JobState.FAILED
            else:
                job.state, job.due = JobState.RETRYABLE, True

    @rule(data=st.data())
    def delete_worker(self, data: st.DataObject) -> None:
        """Graceful unregistration: the worker's unfinished jobs go back to the queue."""
        worker = data.draw(self._worker(), label="worker")
        held = [j for j in self.jobs.values() if j.state is JobState.RUNNING and j.worker == worker]
        released = self.db.call(
            _store.worker_delete,
            self.db.conn,
            self.db.statements,
            worker_id=worker,
            channel=self.db.channel,
            queues=["default"],
        )
        assert released == len(held)
        self.registered.discard(worker)
        self.expired.discard(worker)
        for job in held:
            self._returned(job)

    # -- invariants ------------------------------------------------------------

    @invariant()
    def database_matches_the_model(self) -> None:
        rows, workers = self.db.state()
        assert {row[0] for row in workers} == self.registered
        assert {row[0] for row in workers if row[1]} == self.expired
        assert [row[0] for row in rows] == sorted(self.jobs)
        assert Counter(JobState(row[4]) for row in rows) == Counter(
            j.state for j in self.jobs.values()
        )
        for (
            job_id,
            queue,
            task,
            priority,
            state_text,
            attempt,
            max_attempts,
            worker_id,
            cancel_requested,
            finished,
            errors,
            due,
            text,
            claim_id,
        ) in rows:
            job = self.jobs[job_id]
            state = JobState(state_text)
            where = f"job {job_id}"
            assert (queue, task, priority) == (job.queue, job.task, job.priority), where
            assert state is job.state, f"{where} is {state}, the model says {job.state}"
            assert (attempt, max_attempts) == (job.attempt, job.max_attempts), where
            assert max_attempts == job.initial_max_attempts + job.snoozes + job.returns, where
            assert attempt <= max_attempts, where
            assert (worker_id is not None) == (state is JobState.RUNNING), where
            assert worker_id == job.worker, where
            if state is JobState.RUNNING:
                assert claim_id == job.claim, where
            assert finished == (state in FINAL), where
            assert cancel_requested == job.cancel_requested, where
            assert errors == job.errors, where
            if state in WAITING:
                assert due == job.due, f"{where}: due {due}, the model says {job.due}"
            if state in FINAL:
                first = self.final_rows.setdefault(job_id, text)
                assert text == first, f"finished {where} changed:\n{first}\n{text}"


def test_job_state_machine(db: _Db) -> None:
    class OnThisDatabase(JobStateMachine):
        def __init__(self) -> None:
            super().__init__(db)

    run_state_machine_as_test(OnThisDatabase, settings=SETTINGS)


@settings(SETTINGS, max_examples=20)
@given(
    jobs=st.lists(
        st.tuples(
            st.sampled_from(QUEUES),
            st.sampled_from(TASKS),
            st.integers(-2, 2),
            st.sampled_from([JobState.AVAILABLE, *sorted(DELAYED)]),
        ),
        min_size=1,
        max_size=30,
    ),
    limits=st.lists(st.integers(1, 4), min_size=2, max_size=len(WORKERS)),
)
def test_concurrent_claims_never_share_a_job(
    db: _Db, jobs: list[tuple[str, str, int, JobState]], limits: list[int]
) -> None:
    """Workers claiming at once each get their own jobs, and together every due job once,
    also the delayed ones that their fetches make available on the way, and those that
    fetches of other tasks set aside meanwhile."""
    db.rows("DELETE FROM {schema}.jobs; DELETE FROM {schema}.workers")
    specs = [
        JobSpec(task=task, queue=queue, priority=priority, max_attempts=1, args="{}")
        for queue, task, priority, _ in jobs
    ]
    ids = [
        job_id
        for job_id, _, _ in db.call(
            _store.job_insert_many, db.conn, db.statements, specs, channel=db.channel
        )
    ]
    for job_id, (*_, state) in zip(ids, jobs, strict=True):
        if state is not JobState.AVAILABLE:  # came due a second ago
            db.rows(
                "UPDATE {schema}.jobs SET state = %s::text::{schema}.job_state,"
                " run_at = now() - interval '1 second' WHERE id = %s",
                state.value,
                job_id,
            )
    claimed = db.call(_claim_concurrently, db, limits)
    holder = {c.id: WORKERS[i] for i, batch in enumerate(claimed) for c in batch}
    counts = Counter(c.id for batch in claimed for c in batch)
    assert not [job_id for job_id, n in counts.items() if n > 1], "a job claimed twice"
    # Skipped rows another claim had locked (and let go) are left for the next fetch.
    late = db.call(
        _claimed,
        db.conn,
        db.statements,
        queues=QUEUES,
        tasks=TASKS,
        limit=len(ids),
        worker_id=WORKERS[0],
        claim_id=str(uuid.uuid4()),
    )
    for c in late:
        assert c.id not in holder, f"job {c.id} claimed again"
        holder[c.id] = WORKERS[0]
    assert sorted(holder) == sorted(ids), "every due job is claimed exactly once"
    rows = db.rows("SELECT id, state::text, attempt, worker_id::text FROM {schema}.jobs")
    assert {row[0]: (row[1], row[2], row[3]) for row in rows} == {
        job_id: ("running", 1, worker) for job_id, worker in holder.items()
    }


# -- found while modelling the SQL: the smallest sequences that show them --------

RETURN_PATHS: Final = [
    pytest.param("worker_delete", id="worker_delete"),  # graceful unregistration
    pytest.param("interrupted", id="interrupted-outcome"),  # the worker's shutdown outcome
    pytest.param("rescue", id="rescue"),  # heartbeat expiry: the reference behaviour
]


FIRST_CLAIM: Final = str(uuid.UUID(int=7))


async def _claim(
    queue: pgoutbox.Queue, conn: pgoutbox.Connection[Any], worker: str, claim_id: str
) -> list[ClaimedJob]:
    await _store.worker_register(
        conn,
        queue.statements,
        worker_id=worker,
        hostname="test",
        pid=1,
        queues=["default"],
        tasks=["t"],
        concurrency=1,
        # Tiny, so that rescue's wait after a server start (a freshly started
        # embedded server, say) is over at once; expiry is simulated anyway.
        heartbeat_timeout=QUICK_HEARTBEAT_TIMEOUT,
    )
    return await _claimed(
        conn,
        queue.statements,
        queues=["default"],
        tasks=["t"],
        limit=10,
        worker_id=worker,
        claim_id=claim_id,
    )


async def _lose(
    how: str, queue: pgoutbox.Queue, conn: pgoutbox.Connection[Any], job: ClaimedJob, worker: str
) -> None:
    """The worker running `job` lets it go: unregisters, writes `interrupted`, or dies."""
    st_ = queue.statements
    if how == "release_claim":
        released = await _store.job_release_claim(conn, st_, worker_id=worker, claim_id=FIRST_CLAIM)
        assert released == 1
    elif how == "worker_delete":
        assert (
            await _store.worker_delete(
                conn, st_, worker_id=worker, channel=queue.channel, queues=["default"]
            )
            == 1
        )
    elif how == "interrupted":
        outcome = interrupted(job)  # what the worker writes for an attempt cut short
        assert await _store.job_set_outcome_many(conn, st_, [outcome]) == {(job.id, job.attempt)}
    else:
        await conn.execute(
            sql.SQL(
                "UPDATE {}.workers SET heartbeat_at = now() - interval '1 hour' WHERE id = %s"
            ).format(sql.Identifier(queue.schema)),
            [worker],
        )
        assert await _store.worker_rescue_expired(
            conn, st_, schema=queue.schema, channel=queue.channel
        ) == (1, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("how", RETURN_PATHS)
async def test_job_returned_on_its_last_attempt_is_not_run_again(
    queue: pgoutbox.Queue, database_dsn: str, how: str
) -> None:
    """A job is never claimed past its max_attempts, however its last attempt was lost.

    A rescue fails it; a worker that lets it go gives the attempt back (by
    raising max_attempts, so attempt numbers keep growing).
    """
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        spec = JobSpec(task="t", queue="default", priority=0, max_attempts=1, args="{}")
        await _store.job_insert(conn, queue.statements, spec, channel=None)
        [first] = await _claim(queue, conn, WORKERS[0], FIRST_CLAIM)
        assert (first.attempt, first.max_attempts) == (1, 1)
        await _lose(how, queue, conn, first, WORKERS[0])
        again = await _claim(queue, conn, WORKERS[1], str(uuid.uuid4()))
        assert [(c.attempt, c.max_attempts) for c in again if c.attempt > c.max_attempts] == [], (
            "the job was claimed for an attempt beyond its max_attempts"
        )


@pytest.mark.anyio
@pytest.mark.parametrize("how", [*RETURN_PATHS, pytest.param("release_claim", id="release_claim")])
async def test_job_whose_cancel_was_requested_is_not_run_again(
    queue: pgoutbox.Queue, database_dsn: str, how: str
) -> None:
    """A running job asked to cancel ends `cancelled` when its worker lets it go."""
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        spec = JobSpec(task="t", queue="default", priority=0, max_attempts=3, args="{}")
        job_id, _, _ = await _store.job_insert(conn, queue.statements, spec, channel=None)
        [first] = await _claim(queue, conn, WORKERS[0], FIRST_CLAIM)
        requested = await _store.job_cancel(
            conn,
            queue.statements,
            job_ids=[job_id],
            channel=queue.channel,
            payload=CANCEL_PAYLOAD,
        )
        assert requested == ([], [job_id])
        await _lose(how, queue, conn, first, WORKERS[0])
        record = await _store.job_get(conn, queue.statements, job_id)
        assert record is not None
        assert record.state is JobState.CANCELLED
        assert await _claim(queue, conn, WORKERS[1], str(uuid.uuid4())) == []


@pytest.mark.anyio
@pytest.mark.parametrize("how", [*RETURN_PATHS, pytest.param("retry", id="retry-outcome")])
async def test_a_cancel_that_waits_for_a_running_job_cancels_what_its_worker_made_of_it(
    queue: pgoutbox.Queue, database_dsn: str, how: str
) -> None:
    """The worker of a running job writes a retry, or lets the job go, while a cancel
    waits for the job's row: the cancel sees the job waiting again and cancels it."""
    async with (
        await pgoutbox.connect(database_dsn, autocommit=True) as worker_conn,
        await pgoutbox.connect(database_dsn, autocommit=True) as producer_conn,
    ):
        spec = JobSpec(task="t", queue="default", priority=0, max_attempts=3, args="{}")
        job_id, _, _ = await _store.job_insert(worker_conn, queue.statements, spec, channel=None)
        [job] = await _claim(queue, worker_conn, WORKERS[0], FIRST_CLAIM)
        result: list[pgoutbox.CancelResult] = []

        async def cancel() -> None:
            result.append(await queue.cancel(producer_conn, job_id))

        async with anyio.create_task_group() as tg, worker_conn.transaction():
            if how == "retry":
                retry = Outcome(job.id, job.attempt, JobState.RETRYABLE, 0.0, None, 0, job.claim_id)
                written = await _store.job_set_outcome_many(worker_conn, queue.statements, [retry])
                assert written == {(job.id, job.attempt)}
            else:
                await _lose(how, queue, worker_conn, job, WORKERS[0])
            tg.start_soon(cancel)
            await until_waiting_for_a_lock(worker_conn, producer_conn.info.backend_pid)
        assert result == [pgoutbox.CancelResult(cancelled=(job_id,), requested=())]
        record = await _store.job_get(worker_conn, queue.statements, job_id)
        assert record is not None
        assert record.state is JobState.CANCELLED
