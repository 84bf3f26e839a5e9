"""The only module that executes SQL: one function per named statement.

Each function takes the connection to run on and the `Statements` rendered for
the queue's schema; none opens a transaction unless its docstring says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Final, NamedTuple

import msgspec
import psycopg
from psycopg import sql
from psycopg.abc import Buffer, Params
from psycopg.adapt import Dumper
from psycopg.postgres import types as pg_types
from psycopg.rows import tuple_row

from ._job import (
    NOTIFY_WITHIN,
    ClaimedJob,
    JobError,
    JobRecord,
    JobSpec,
    JobState,
    Outcome,
    QueueCounts,
    QueueStatus,
    WorkerInfo,
)
from ._sql import PlannedPerCall, Statements, load_migrations
from .errors import PgoutboxError, SchemaError

__all__ = [
    "job_cancel",
    "job_claim",
    "job_complete_fenced",
    "job_count_unfinished",
    "job_get",
    "job_insert",
    "job_insert_many",
    "job_insert_many_sync",
    "job_insert_sync",
    "job_prune",
    "job_release_claim",
    "job_set_outcome_many",
    "listen",
    "migrate",
    "schema_version",
    "status",
    "worker_delete",
    "worker_heartbeat",
    "worker_register",
    "worker_rescue_expired",
]

AnyConnection = psycopg.AsyncConnection[Any]
AnySyncConnection = psycopg.Connection[Any]
_Query = str | bytes | sql.SQL | sql.Composed

_error_decoder = msgspec.json.Decoder(JobError)


class _BigintArray(list[int]):
    """Integers sent as one ``bigint[]`` literal (job ids of a batch of outcomes).

    psycopg's generic list dumper looks at every element: about 400 µs for the
    ids and attempts of a batch of 200, paid by every fetch that carries
    completions. Joining the digits costs a fifth of that.
    """


class _IntegerArray(list[int]):
    """Integers sent as one ``integer[]`` literal (attempt numbers)."""


class _IntArrayDumper(Dumper):
    def dump(self, obj: list[int]) -> Buffer:
        return ("{" + ",".join(map(str, obj)) + "}").encode()


class _BigintArrayDumper(_IntArrayDumper):
    oid = pg_types["int8"].array_oid


class _IntegerArrayDumper(_IntArrayDumper):
    oid = pg_types["int4"].array_oid


# Connections made before this import fall back to the list dumper: slower, same values.
psycopg.adapters.register_dumper(_BigintArray, _BigintArrayDumper)
psycopg.adapters.register_dumper(_IntegerArray, _IntegerArrayDumper)


async def _execute(
    conn: AnyConnection, query: _Query, params: Params | None = None, *, binary: bool = False
) -> psycopg.AsyncCursor[tuple[Any, ...]]:
    """Run `query` on a cursor of tuples, whatever row factory the caller's connection has.

    `binary` asks for binary results, unless the connection makes client-side
    cursors (as Django's backend does), which cannot load them. A
    `PlannedPerCall` statement is never prepared.
    """
    binary = binary and not issubclass(conn.cursor_factory, psycopg.AsyncClientCursor)
    cur = conn.cursor(row_factory=tuple_row, binary=binary)
    await cur.execute(query, params, prepare=_prepare(query))
    return cur


def _prepare(query: _Query) -> bool | None:
    """False for a `PlannedPerCall` statement; None (the connection decides) otherwise."""
    return False if isinstance(query, PlannedPerCall) else None


def _execute_sync(
    conn: AnySyncConnection, query: _Query, params: Params | None = None, *, binary: bool = False
) -> psycopg.Cursor[tuple[Any, ...]]:
    """`_execute` on a sync connection."""
    binary = binary and not issubclass(conn.cursor_factory, psycopg.ClientCursor)
    cur = conn.cursor(row_factory=tuple_row, binary=binary)
    cur.execute(query, params, prepare=_prepare(query))
    return cur


async def schema_version(conn: AnyConnection, st: Statements) -> int | None:
    """The highest applied migration, or None when the schema is not installed."""
    try:
        async with conn.transaction():
            cur = await _execute(conn, st.schema_version)
            row = await cur.fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return None
    return None if row is None else row[0]


async def migrate(conn: AnyConnection, st: Statements, schema: str) -> list[int]:
    """Apply the missing migrations in one transaction, under an advisory lock.

    Concurrent callers queue on the lock; the later ones find nothing to do.
    Returns the versions this call applied.
    """
    applied_now: list[int] = []
    async with conn.transaction():
        await _execute(conn, st.migration_lock, {"schema": schema})
        await _execute(conn, st.migration_table_create)
        cur = await _execute(conn, st.migration_applied_list)
        applied = {row[0] for row in await cur.fetchall()}
        for migration in load_migrations(schema):
            if migration.version in applied:
                continue
            await _execute(conn, migration.script)
            await _execute(
                conn, st.migration_record, {"version": migration.version, "name": migration.name}
            )
            applied_now.append(migration.version)
    return applied_now


def _job_insert_query(
    st: Statements, spec: JobSpec, channel: str | None
) -> tuple[bytes, dict[str, Any]]:
    params: dict[str, Any] = {
        "queue": spec.queue,
        "task": spec.task,
        "args": spec.args,
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "headers": _headers_json(spec),
        "run_at": spec.run_at,
        "delay": float(spec.delay),
        "state": "available" if spec.due_now() else "scheduled",
    }
    if spec.key is not None:
        params["key"] = spec.key
        params["notify"] = channel is not None
        params["channel"] = channel or ""
        params["notify_within"] = NOTIFY_WITHIN
        return st.job_insert_unique, params
    if channel is not None:
        params["channel"] = channel
        params["notify_within"] = NOTIFY_WITHIN
        return st.job_insert_notify, params
    return st.job_insert, params


@contextlib.contextmanager
def _needs_version(version: int, what: str) -> Iterator[None]:
    """Turn the error of a statement that uses a column or function added by migration
    `version`, on a schema not yet upgraded, into a `SchemaError` that says what to do."""
    try:
        yield
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction) as ex:
        if "unique_key" not in str(ex):  # not ours: a user's trigger, say
            raise
        raise SchemaError(
            f"{what} needs pgoutbox schema version {version}: run "
            "`python -m pgoutbox migrate <module>:<queue>` or `await queue.migrate()`"
        ) from ex


UNIQUE_TRIES: Final = 3
"""Rounds of insert-or-find for a job with a unique key (see `job_insert`)."""


class _InsertRow(msgspec.Struct, omit_defaults=True):
    """One job of `job_insert_many`'s JSON array (omitted keys read as NULL)."""

    queue: str
    task: str
    args: msgspec.Raw  # already JSON: embedded as is
    priority: int
    state: str
    max_attempts: int
    run_at: datetime | None = None
    delay: float = 0.0
    headers: dict[str, str] | None = None


_encode_rows = msgspec.json.Encoder().encode


def _same_instant(a: datetime | None, b: datetime | None) -> bool:
    """Equal as instants: `==` ignores `fold` between datetimes of one tzinfo, so two
    wall times an hour apart in a DST change would compare equal."""
    return a is not None and b is not None and a == b and a.utcoffset() == b.utcoffset()


def _uniform(specs: Sequence[JobSpec]) -> bool:
    """Whether the jobs differ only in their arguments (`job_insert_many_uniform` applies)."""
    first = specs[0]
    queue, task, priority, max_attempts = (
        first.queue,
        first.task,
        first.priority,
        first.max_attempts,
    )
    delay, run_at, headers = first.delay, first.run_at, first.headers
    return all(
        s.task == task
        and s.queue == queue
        and s.priority == priority
        and s.max_attempts == max_attempts
        and s.delay == delay
        and (s.run_at is run_at or _same_instant(s.run_at, run_at))
        and s.headers == headers
        for s in specs
    )


def _job_insert_many_query(
    st: Statements, specs: Sequence[JobSpec], channel: str | None
) -> tuple[bytes, dict[str, Any], bool]:
    """The statement and parameters, and whether it is `job_insert_many_uniform`."""
    if _uniform(specs):
        first = specs[0]
        due = first.due_now()
        return (
            st.job_insert_many_uniform,
            {
                "queue": first.queue,
                "task": first.task,
                "priority": first.priority,
                "state": "available" if due else "scheduled",
                "max_attempts": first.max_attempts,
                "run_at": first.run_at,
                "delay": float(first.delay),
                "headers": _headers_json(first),
                "args": "[" + ",".join([s.args for s in specs]) + "]",
                "count": len(specs),
                "channel": channel or "",
                "notify": channel is not None,
                "notify_within": NOTIFY_WITHIN,
            },
            True,
        )
    rows: list[_InsertRow] = []
    for s in specs:
        due = s.due_now()
        rows.append(
            _InsertRow(
                queue=s.queue,
                task=s.task,
                args=msgspec.Raw(s.args),
                priority=s.priority,
                state="available" if due else "scheduled",
                max_attempts=s.max_attempts,
                run_at=s.run_at,
                delay=float(s.delay),
                headers=s.headers or None,
            )
        )
    return (
        st.job_insert_many,
        {
            "jobs": _encode_rows(rows).decode(),
            "channel": channel or "",
            "notify": channel is not None,
            "notify_within": NOTIFY_WITHIN,
        },
        False,
    )


class Inserted(NamedTuple):
    """A job as enqueue wrote it, or as it found it holding the unique key."""

    id: int
    run_at: datetime
    holder: tuple[str, str] | None = None
    """For a duplicate, the (task, queue) of the job that holds the key."""


def _inserted_many(rows: list[tuple[Any, ...]], uniform: bool) -> list[Inserted]:
    if uniform:  # ids, then one row with the run_at they share
        run_at = rows[-1][1]
        return [Inserted(row[0], run_at) for row in rows[:-1]]
    return [Inserted(row[0], row[1]) for row in rows]


def _headers_json(spec: JobSpec) -> str | None:
    return None if not spec.headers else msgspec.json.encode(spec.headers).decode()


def _inserted(row: tuple[Any, ...]) -> Inserted:
    """From job_insert*'s row: (id, run_at[, notified]), or job_insert_unique's
    (id, run_at, task, queue), whose task and queue are set only for a duplicate."""
    if len(row) == 4 and row[2] is not None:
        return Inserted(row[0], row[1], (row[2], row[3]))
    return Inserted(row[0], row[1])


async def job_insert(
    conn: AnyConnection, st: Statements, spec: JobSpec, *, channel: str | None
) -> Inserted:
    """Insert one job in one statement; with a `channel`, NOTIFY it in the same statement.
    Returns its id and run_at, or, if an unfinished job held the spec's unique
    key (nothing was written), that job's id and run_at with its task and queue.

    One statement keeps the row and its notification atomic even on an
    autocommit connection; in a transaction, both wait for its commit. With a
    unique key, a job that committed the key while this statement waited for
    it is not in its snapshot, and no row comes back: the statement runs again
    (in READ COMMITTED, with a snapshot that has it, or, if it has finished
    meanwhile, writing the job after all).
    """
    query, params = _job_insert_query(st, spec, channel)
    with _needs_version(11, "a job with a unique key") if spec.key else contextlib.nullcontext():
        for _ in range(UNIQUE_TRIES):
            row = await (await _execute(conn, query, params)).fetchone()
            if row is not None:
                return _inserted(row)
    raise _key_contended(spec)


def job_insert_sync(
    conn: AnySyncConnection, st: Statements, spec: JobSpec, *, channel: str | None
) -> Inserted:
    """`job_insert` on a sync connection."""
    query, params = _job_insert_query(st, spec, channel)
    with _needs_version(11, "a job with a unique key") if spec.key else contextlib.nullcontext():
        for _ in range(UNIQUE_TRIES):
            row = _execute_sync(conn, query, params).fetchone()
            if row is not None:
                return _inserted(row)
    raise _key_contended(spec)


def _key_contended(spec: JobSpec) -> PgoutboxError:
    return PgoutboxError(
        f"task {spec.task!r}: could not enqueue a job with its unique key, nor find the job "
        f"holding it, in {UNIQUE_TRIES} tries: jobs with that key are enqueued and finished "
        "faster than this producer can look"
    )


async def job_insert_many(
    conn: AnyConnection, st: Statements, specs: Sequence[JobSpec], *, channel: str | None
) -> list[Inserted]:
    """Insert many jobs in one statement, NOTIFYing each queue that got a due job once.

    Returns what `job_insert` returns per job, in the order of `specs`. Jobs with
    a unique key take one `job_insert` each, after the statement for the rest,
    in the order of their keys (so that two batches never wait for each other's
    keys in a cycle); on an autocommit connection, in one transaction that this
    opens and commits, so that the batch stays all or nothing.
    """
    plain, keyed = _split_keyed(specs)
    if not keyed:
        query, params, uniform = _job_insert_many_query(st, plain, channel)
        # Binary results: ids and timestamps load faster than from text.
        cur = await _execute(conn, query, params, binary=True)
        return _inserted_many(await cur.fetchall(), uniform)
    # Several statements: on an autocommit connection, one transaction keeps the
    # batch all or nothing, as one statement would.
    async with conn.transaction() if conn.autocommit else contextlib.nullcontext():
        rows: list[Inserted] = []
        if plain:
            query, params, uniform = _job_insert_many_query(st, plain, channel)
            cur = await _execute(conn, query, params, binary=True)
            rows = _inserted_many(await cur.fetchall(), uniform)
        by_key = [await job_insert(conn, st, spec, channel=channel) for _, spec in keyed]
    return _merged(len(specs), rows, keyed, by_key)


def job_insert_many_sync(
    conn: AnySyncConnection, st: Statements, specs: Sequence[JobSpec], *, channel: str | None
) -> list[Inserted]:
    """`job_insert_many` on a sync connection."""
    plain, keyed = _split_keyed(specs)
    if not keyed:
        query, params, uniform = _job_insert_many_query(st, plain, channel)
        return _inserted_many(_execute_sync(conn, query, params, binary=True).fetchall(), uniform)
    with conn.transaction() if conn.autocommit else contextlib.nullcontext():
        rows: list[Inserted] = []
        if plain:
            query, params, uniform = _job_insert_many_query(st, plain, channel)
            cur = _execute_sync(conn, query, params, binary=True)
            rows = _inserted_many(cur.fetchall(), uniform)
        by_key = [job_insert_sync(conn, st, spec, channel=channel) for _, spec in keyed]
    return _merged(len(specs), rows, keyed, by_key)


def _split_keyed(
    specs: Sequence[JobSpec],
) -> tuple[list[JobSpec], list[tuple[int, JobSpec]]]:
    """The specs without a unique key, and those with one (with their positions)."""
    if all(spec.key is None for spec in specs):
        return list(specs), []
    plain = [spec for spec in specs if spec.key is None]
    # In the order of their keys: a batch holds the keys it takes until it
    # commits, and two batches taking the same keys in different orders would
    # deadlock. Stable: of two specs with one key, the first is written.
    keyed = sorted(
        ((i, spec) for i, spec in enumerate(specs) if spec.key is not None),
        key=lambda item: item[1].key or "",
    )
    return plain, keyed


def _merged(
    count: int,
    plain_rows: list[Inserted],
    keyed: list[tuple[int, JobSpec]],
    keyed_rows: list[Inserted],
) -> list[Inserted]:
    """The rows of both kinds back in the order of the specs."""
    merged: list[Inserted | None] = [None] * count
    for (i, _), row in zip(keyed, keyed_rows, strict=True):
        merged[i] = row
    rest = iter(plain_rows)
    return [row if row is not None else next(rest) for row in merged]


def _claims(outcomes: Sequence[Outcome]) -> list[str]:
    """The distinct claims of `outcomes`: a few per batch (one per fetch that claimed them)."""
    return list({o.claim_id for o in outcomes if o.claim_id is not None})


async def job_claim(
    conn: AnyConnection,
    st: Statements,
    *,
    queues: Sequence[str],
    tasks: Sequence[str],
    limit: int,
    worker_id: str,
    claim_id: str,
    completed: Sequence[Outcome] = (),
    keep_completed: bool = True,
) -> tuple[list[ClaimedJob], set[tuple[int, int]], float | None]:
    """Claim up to `limit` due jobs of these queues and tasks, marked with `claim_id`,
    and complete the `completed` attempts (fenced) in the same statement.

    Returns the claimed jobs, the (id, attempt) of the attempts completed (kept as
    ``completed``, or deleted unless `keep_completed`), and, when fewer than
    `limit` jobs were claimed, the seconds until the next delayed job of these
    queues and tasks is due (None if there is none, or the fetch was full; 0
    when the fetch set aside jobs of tasks no registered worker runs, since the
    worker's own jobs may wait behind more of them: fetch again at once).

    With no `completed`, the statement commits asynchronously (see the SQL):
    on an autocommit connection, as the worker's is, that saves waiting for
    the WAL flush.
    """
    cur = await _execute(
        conn,
        st.job_claim,
        {
            "done_ids": _BigintArray([o.id for o in completed]),
            "done_attempts": _IntegerArray([o.attempt for o in completed]),
            "done_claims": _claims(completed),
            "keep_completed": keep_completed,
            "queues": list(queues),
            "tasks": list(tasks),
            "limit": limit,
            "worker_id": worker_id,
            "claim_id": claim_id,
        },
    )
    rows = await cur.fetchall()
    written = {(pair[0], pair[1]) for pair in rows[-1][8]}
    next_due: float | None = rows[-1][9]
    return (
        [
            ClaimedJob(
                id=r[0],
                queue=r[1],
                task=r[2],
                args=r[3],
                priority=r[4],
                attempt=r[5],
                max_attempts=r[6],
                headers=r[7],
                claim_id=claim_id,
            )
            for r in rows[:-1]
        ],
        written,
        next_due,
    )


async def job_release_claim(
    conn: AnyConnection, st: Statements, *, worker_id: str, claim_id: str
) -> int:
    """Give back the still-running jobs of one fetch (whose rows never arrived)."""
    cur = await _execute(conn, st.job_release_claim, {"worker_id": worker_id, "claim_id": claim_id})
    return len(await cur.fetchall())


_MAX_INT4: Final = 2**31 - 1
"""The largest value of an integer setting (milliseconds here)."""


async def fetch_session_start(
    conn: AnyConnection, st: Statements, *, key: int, idle_timeout: float
) -> bool:
    """Lock `key` for the session of `conn` (False if another session holds it),
    and have the server end the session within about `idle_timeout` seconds of
    its client going away."""
    idle_ms = round(idle_timeout * 1000)
    params = {"key": key, "idle_ms": str(idle_ms if idle_ms <= _MAX_INT4 else 0)}
    cur = await _execute(conn, st.fetch_session_start, params)
    row = await cur.fetchone()
    if not (row and row[0]):
        return False
    # Best effort: servers on some platforms refuse it.
    with contextlib.suppress(psycopg.errors.InvalidParameterValue):
        await _execute(conn, st.fetch_session_check_client)
    return True


async def fetch_sessions_ended(
    conn: AnyConnection, st: Statements, *, keys: Sequence[int]
) -> set[int]:
    """Those of `keys` whose session lock is free: the sessions that took them have ended."""
    cur = await _execute(conn, st.fetch_sessions_ended, {"keys": list(keys)})
    return {row[0] for row in await cur.fetchall()}


async def job_set_outcome_many(
    conn: AnyConnection,
    st: Statements,
    outcomes: Sequence[Outcome],
    *,
    keep_completed: bool = True,
) -> set[tuple[int, int]]:
    """Write many outcomes in one statement, fenced by attempt; return the (id, attempt)
    of those written.

    A job is only written while it is still ``running`` under the same attempt,
    so a worker that lost a job can never overwrite a newer attempt.
    Completed attempts are deleted unless `keep_completed` (then a batch that
    mixes them with other outcomes takes two statements).
    """
    completions = [o for o in outcomes if o.state is JobState.COMPLETED]
    written: set[tuple[int, int]] = set()
    if completions and (len(completions) == len(outcomes) or not keep_completed):
        cur = await _execute(
            conn,
            st.job_complete_many,
            {
                "ids": _BigintArray([o.id for o in completions]),
                "attempts": _IntegerArray([o.attempt for o in completions]),
                "claims": _claims(completions),
                "keep_completed": keep_completed,
            },
        )
        written.update((row[0], row[1]) for row in await cur.fetchall())
        if len(completions) == len(outcomes):
            return written
        outcomes = [o for o in outcomes if o.state is not JobState.COMPLETED]
    cur = await _execute(
        conn,
        st.job_set_outcome_many,
        {
            "ids": _BigintArray([o.id for o in outcomes]),
            "attempts": _IntegerArray([o.attempt for o in outcomes]),
            "states": [o.state.value for o in outcomes],
            "delays": [None if o.delay is None else float(o.delay) for o in outcomes],
            "errors": [o.error for o in outcomes],
            "extra_attempts": [o.extra_attempts for o in outcomes],
            "claims": _claims(outcomes),
        },
    )
    written.update((row[0], row[1]) for row in await cur.fetchall())
    return written


async def job_get(conn: AnyConnection, st: Statements, job_id: int) -> JobRecord | None:
    """One job row, or None."""
    with _needs_version(11, "get_job"):
        cur = await _execute(conn, st.job_get, {"id": job_id})
    r = await cur.fetchone()
    if r is None:
        return None
    return JobRecord(
        id=r[0],
        queue=r[1],
        task=r[2],
        args=r[3],
        priority=r[4],
        state=JobState(r[5]),
        attempt=r[6],
        max_attempts=r[7],
        run_at=r[8],
        created_at=r[9],
        attempted_at=r[10],
        finished_at=r[11],
        errors=tuple(_error_decoder.decode(e) for e in r[12]),
        key=r[13],
    )


async def worker_register(
    conn: AnyConnection,
    st: Statements,
    *,
    worker_id: str,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    tasks: Sequence[str],
    concurrency: int,
    heartbeat_timeout: float,
) -> None:
    """Record a live worker (again, if its row was removed)."""
    await _execute(
        conn,
        st.worker_register,
        {
            "id": worker_id,
            "hostname": hostname,
            "pid": pid,
            "queues": list(queues),
            "tasks": list(tasks),
            "concurrency": concurrency,
            "heartbeat_timeout": heartbeat_timeout,
        },
    )


async def worker_delete(
    conn: AnyConnection,
    st: Statements,
    *,
    worker_id: str,
    channel: str,
    queues: Sequence[str],
) -> int:
    """Remove a worker's row and make any job it still holds available; return how many.

    NOTIFY each of `queues` on `channel`: other workers then start at once what
    this one gave back, here or in its last outcomes.
    """
    cur = await _execute(
        conn, st.worker_delete, {"id": worker_id, "channel": channel, "queues": list(queues)}
    )
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def listen(conn: AnyConnection, channel: str) -> None:
    """LISTEN on `channel` (an identifier, composed safely).

    The session waits, idle, by design: an `idle_session_timeout` set for the
    database or role (PostgreSQL 14 and later) would end it again and again, so
    it is turned off for this session. Keepalives and the listener's probes
    notice a lost peer instead.
    """
    if conn.info.server_version >= 140000:
        await _execute(conn, "SET idle_session_timeout = 0")
    await _execute(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


async def job_complete_fenced(
    conn: AnyConnection, st: Statements, *, job_id: int, attempt: int, claim_id: str | None = None
) -> bool:
    """Complete a running job if it still runs under `attempt` and the claim `claim_id`
    (None: any claim), in the caller's transaction."""
    cur = await _execute(
        conn,
        st.job_complete_fenced,
        {"id": job_id, "attempt": attempt, "claim_id": claim_id},
    )
    return await cur.fetchone() is not None


async def job_cancel(
    conn: AnyConnection, st: Statements, *, job_ids: Sequence[int], channel: str, payload: str
) -> tuple[list[int], list[int]]:
    """Cancel the waiting jobs among `job_ids`, flag the running ones for cancellation
    and NOTIFY their workers, in one statement. Returns (cancelled, flagged), sorted."""
    cur = await _execute(
        conn, st.job_cancel, {"ids": list(job_ids), "channel": channel, "payload": payload}
    )
    rows = await cur.fetchall()
    return sorted(r[0] for r in rows if not r[1]), sorted(r[0] for r in rows if r[1])


async def worker_heartbeat(
    conn: AnyConnection, st: Statements, *, worker_id: str
) -> tuple[bool, list[int]]:
    """Refresh a worker's heartbeat; return (its row exists, its jobs to cancel)."""
    cur = await _execute(conn, st.worker_heartbeat, {"id": worker_id})
    row = await cur.fetchone()
    assert row is not None  # noqa: S101 (a SELECT without FROM returns one row)
    return bool(row[0]), list(row[1])


async def worker_rescue_expired(
    conn: AnyConnection, st: Statements, *, schema: str, channel: str
) -> tuple[int, int]:
    """Remove workers silent past their heartbeat timeout and rescue their jobs, unless
    another worker holds the maintenance lock. Returns (workers removed, jobs rescued).
    The queues of jobs that can run again get a NOTIFY on `channel`.
    """
    cur = await _execute(conn, st.worker_rescue_expired, {"schema": schema, "channel": channel})
    row = await cur.fetchone()
    assert row is not None  # noqa: S101 (a SELECT without FROM returns one row)
    return int(row[0]), int(row[1])


async def job_prune(
    conn: AnyConnection,
    st: Statements,
    *,
    schema: str,
    completed_retention: float,
    failed_retention: float,
    limit: int,
) -> int:
    """Delete up to `limit` finished jobs past their retention; return how many."""
    cur = await _execute(
        conn,
        st.job_prune,
        {
            "schema": schema,
            "completed_retention": completed_retention,
            "failed_retention": failed_retention,
            "limit": limit,
        },
    )
    return cur.rowcount


async def jobs_vacuum_due(
    conn: AnyConnection, st: Statements, *, schema: str, threshold: int
) -> tuple[bool, int]:
    """Whether the jobs table holds `threshold` dead rows that this connection's role
    may vacuum, unless another worker holds the maintenance lock; and how many rows
    of it were updated or deleted so far (see the statement)."""
    cur = await _execute(conn, st.jobs_vacuum_due, {"schema": schema, "threshold": threshold})
    row = await cur.fetchone()
    if row is None:  # no jobs table: nothing to vacuum
        return False, 0
    return bool(row[0]), int(row[1])


async def jobs_vacuum(conn: AnyConnection, *, schema: str) -> None:
    """Vacuum the jobs table and its indexes, unless another vacuum of it is running.

    ``SKIP_LOCKED``: skip the table at once if its lock is taken (PostgreSQL
    then only warns). ``INDEX_CLEANUP ON``: remove the dead index entries even
    when few pages hold dead rows, which PostgreSQL would otherwise leave; they
    are what fetches read past. ``TRUNCATE OFF``: do not take the exclusive lock
    that giving empty pages back needs; a queue fills them again.
    VACUUM cannot run in a transaction block: `conn` must be in autocommit mode.
    """
    await conn.execute(
        sql.SQL("VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, TRUNCATE OFF) {}").format(
            sql.Identifier(schema, "jobs")
        )
    )


async def status(conn: AnyConnection, st: Statements) -> QueueStatus:
    """Jobs per queue and state, and the registered workers."""
    per_queue: dict[str, dict[JobState, int]] = {}
    oldest: dict[str, float | None] = {}
    cur = await _execute(conn, st.status_queues)
    for queue, state, count, age in await cur.fetchall():
        per_queue.setdefault(queue, {})[JobState(state)] = count
        if age is not None:
            oldest[queue] = max(age, oldest.get(queue) or 0.0)
    cur = await _execute(conn, st.status_workers)
    workers = tuple(
        WorkerInfo(
            id=r[0],
            hostname=r[1],
            pid=r[2],
            queues=tuple(r[3]),
            concurrency=r[4],
            started_at=r[5],
            heartbeat_age=r[6],
            running=r[7],
        )
        for r in await cur.fetchall()
    )
    return QueueStatus(
        queues=tuple(
            QueueCounts(queue=q, counts=counts, oldest_due_age=oldest.get(q))
            for q, counts in per_queue.items()
        ),
        workers=workers,
    )


async def job_count_unfinished(
    conn: AnyConnection, st: Statements, *, tasks: Sequence[str]
) -> dict[str, int]:
    """Jobs of these tasks running or due now, by queue: every queue that holds an
    unfinished job of theirs, due or not (0 if none is due); others are absent."""
    cur = await _execute(conn, st.job_count_unfinished, {"tasks": list(tasks)})
    return {str(queue): int(count) for queue, count in await cur.fetchall()}
