"""The queue: the task registry, transactional enqueue, migrations."""

from __future__ import annotations

import os
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, Final, ParamSpec, Protocol, Self, TypeVar, overload

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import _store
from ._connection import Connection
from ._job import CancelResult, Job, JobRecord, JobSpec, QueueStatus
from ._pool import Pool
from ._sql import Statements, load_migrations, load_statements
from ._task import (
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    RetryPolicy,
    Task,
    TaskRef,
    check_specs,
)
from .errors import (
    ConfigurationError,
    PayloadError,
    PgoutboxError,
    SchemaError,
    TaskNotFoundError,
)
from .instrumentation import Instrumentation, combine

__all__ = ["CANCEL_PAYLOAD", "DEFAULT_SCHEMA", "DSN_ENV", "ConnectionSource", "Queue"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_SCHEMA: Final = "pgoutbox"
"""The schema that holds pgoutbox's tables unless `Queue` is given another."""

DSN_ENV: Final = "PGOUTBOX_DSN"
"""The environment variable `Queue` reads its connection string from by default."""

CANCEL_PAYLOAD: Final = "!cancel"
"""NOTIFY payload asking workers to look for cancel requests (never a queue name)."""

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


class ConnectionSource(Protocol):
    """Anything with a ``connection()`` context manager.

    For example a `psycopg_pool.AsyncConnectionPool` (asyncio only) or a `Pool`.
    """

    def connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """Borrow a connection for the duration of the block."""
        ...


def _checked_conninfo(conninfo: str) -> str:
    """`conninfo` if libpq can read it; else a `ConfigurationError` that does not quote
    it (libpq's own messages quote the text around the mistake, which may be a
    password)."""
    try:
        parsed = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        raise ConfigurationError(
            "the connection string is not valid libpq syntax (not shown: it may hold a password)"
        ) from None
    if conninfo.startswith(("postgresql://", "postgres://")) and "@" in str(parsed.get("host", "")):
        raise ConfigurationError(
            "the connection URI's host holds '@': write '@' in a user name or password as %40"
        )
    return conninfo


class Queue:
    """A pgoutbox installation: where jobs are stored, and the tasks that run them.

    Args:
        conninfo: libpq connection string for migrations, workers and
            `connection`; defaults to the ``PGOUTBOX_DSN`` environment variable,
            read when first needed (so producers that only call `enqueue` on
            their own connections need none).
        pool: connections to lend from `connection` instead of pgoutbox's own
            pool, e.g. a `psycopg_pool.AsyncConnectionPool` (asyncio only).
        schema: the PostgreSQL schema of pgoutbox's tables.
        instrumentation: tracing and metrics hooks (see `pgoutbox.instrumentation`).
        notify: send a NOTIFY with each enqueue so idle workers start the job
            within milliseconds. A transaction that notifies takes a
            cluster-wide lock at commit, which limits concurrent enqueue
            throughput (about half, measured with 16 producers); with False,
            workers find jobs by polling (``poll_interval``) instead.

    Attributes:
        schema: the PostgreSQL schema of pgoutbox's tables.
        channel: the NOTIFY channel, ``"<schema>_jobs"``.
        notify: whether enqueues send a NOTIFY.

    Raises:
        ConfigurationError: the schema name is not a plain lower-case identifier.
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        pool: ConnectionSource | None = None,
        schema: str = DEFAULT_SCHEMA,
        instrumentation: Sequence[Instrumentation] = (),
        notify: bool = True,
    ) -> None:
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"invalid schema name {schema!r}: use 1-48 characters from a-z, 0-9 and '_', "
                "starting with a letter or '_'"
            )
        if schema.startswith("pg_") or schema == "information_schema":
            raise ConfigurationError(
                f"invalid schema name {schema!r}: PostgreSQL reserves 'pg_*' and "
                "'information_schema' for itself"
            )
        self.schema = schema
        self.channel = f"{schema}_jobs"
        self.statements: Statements = load_statements(schema)
        self._conninfo = conninfo
        self._pool = pool
        self._own_pool: Pool | None = None
        self._tasks: dict[str, Task[Any, Any]] = {}
        self.instrumentation = combine(instrumentation)
        self.notify = notify
        # Set by pgoutbox.testing.capture(): enqueue records jobs in memory instead.
        self._capture: Callable[[JobSpec], Job] | None = None
        self._capture_cancel: Callable[[Sequence[int]], CancelResult] | None = None

    def __repr__(self) -> str:
        return f"<Queue schema={self.schema!r} tasks={len(self._tasks)}>"

    @property
    def conninfo(self) -> str:
        """The connection string: as given, else ``$PGOUTBOX_DSN``, else the pool's.

        Raises:
            ConfigurationError: there is none, or it is not a valid libpq
                connection string (the message does not quote it: it may hold a
                password).
        """
        found = self._conninfo_if_any()
        if not found:
            raise ConfigurationError(
                f"no database to connect to: pass Queue(conninfo=...) or set {DSN_ENV}"
            )
        return _checked_conninfo(found)

    def _conninfo_if_any(self) -> str | None:
        """The connection string as configured, unchecked; None if there is none."""
        found = self._conninfo or os.environ.get(DSN_ENV) or getattr(self._pool, "conninfo", None)
        return str(found) if found else None

    def use_pool(self, pool: ConnectionSource | None) -> None:
        """Lend connections from `pool` from now on (None: pgoutbox's own pool).

        For a module-level queue whose pool is opened later, e.g. in a web
        app's lifespan. Call `aclose` first if the queue's own pool was used.
        """
        self._pool = pool

    # -- registry ------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The registered tasks by name (a copy: changing it registers nothing)."""
        return dict(self._tasks)

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered as `name`.

        Raises:
            TaskNotFoundError: no task of that name is registered here.
        """
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskNotFoundError(
                f"no task named {name!r} is registered on {self!r}; "
                f"registered: {sorted(self._tasks) or 'none'}"
            ) from None

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = DEFAULT_PRIORITY,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = DEFAULT_PRIORITY,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Register an ``async def`` handler as a task; use bare or with options.

        Args:
            name: the task name; defaults to ``"<module>.<qualname>"``. Keep it
                stable: it is stored in every job.
            queue: the queue its jobs wait in.
            priority: its jobs' priority; higher runs first.
            retry: its retry policy; defaults to `RetryPolicy()`.
            timeout: seconds an attempt may run before it is cancelled and
                counted as failed; None for no limit.

        Raises:
            ConfigurationError: the handler is not an ``async def`` function, an
                option is invalid, the name is taken, or a parameter cannot be encoded.
        """

        def register(handler: Callable[..., Awaitable[Any]]) -> Task[Any, Any]:
            task_name = f"{handler.__module__}.{handler.__qualname__}" if name is None else name
            if task_name in self._tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            task = Task(
                handler,
                name=task_name,
                queue=queue,
                priority=priority,
                retry=retry or RetryPolicy(),
                timeout=timeout,
            )
            self._tasks[task_name] = task
            return task

        return register if fn is None else register(fn)

    # -- enqueue -------------------------------------------------------------

    @overload
    async def enqueue(
        self,
        conn: psycopg.AsyncConnection[Any],
        task: Task[P, Any],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Job: ...

    @overload
    async def enqueue(
        self, conn: psycopg.AsyncConnection[Any], task: str | TaskRef, /, **kwargs: Any
    ) -> Job: ...

    async def enqueue(
        self,
        conn: psycopg.AsyncConnection[Any],
        task: Task[Any, Any] | str | TaskRef,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Job:
        """Write a job, and its wake-up NOTIFY, on the caller's connection.

        Inside a transaction, the job and the notification exist only if that
        transaction commits; on an autocommit connection the single statement
        commits both at once. Enqueue never opens or commits a transaction.
        A job due more than a minute from now (`NOTIFY_WITHIN`) sends no
        NOTIFY: workers find it at a poll before it is due. Neither does any
        job of a queue made with ``notify=False``.

        Args:
            conn: the caller's psycopg async connection.
            task: a `Task`, a task name, or a `TaskRef`.
            *args: the handler's arguments (a `Task` only).
            **kwargs: the handler's keyword arguments.

        Returns:
            A handle with the job's id.

        Raises:
            PayloadError: the arguments do not fit the task; nothing is written.
            ConfigurationError: `conn` is not a `psycopg.AsyncConnection`.
            SchemaError: the job has a unique key, and the schema is older than
                version 11.
        """
        spec = self._bind(task, args, kwargs)
        if self.instrumentation is None:
            return await self._insert(conn, spec)
        with self.instrumentation.enqueuing([spec]) as (instrumented,):
            return await self._insert(conn, instrumented)

    async def _insert(self, conn: psycopg.AsyncConnection[Any], spec: JobSpec) -> Job:
        if self._capture is not None:
            return self._capture(spec)
        _check_connection(conn, sync=False)
        row = await _store.job_insert(conn, self.statements, spec, channel=self._notify_channel)
        return _job(row, spec)

    async def enqueue_many(
        self, conn: psycopg.AsyncConnection[Any], specs: Iterable[JobSpec], /
    ) -> list[Job]:
        """Write many jobs in one statement, with one NOTIFY per queue that has a due job.

        Make the specs with `Task.bind` (validated against the handler) or
        `TaskRef.bind`; tasks and queues may be mixed. Like `enqueue`, this runs
        on the caller's connection and leaves its transaction to the caller.
        Jobs with a unique key take a statement each, after the others: on an
        autocommit connection, the batch then runs in one transaction of its
        own, so that it stays all or nothing.

        Returns:
            The jobs, in the order of `specs`.

        Raises:
            ConfigurationError: an item is not a `JobSpec`, a hand-made spec has
                an invalid option, or `conn` is not a `psycopg.AsyncConnection`;
                nothing is written.
            PayloadError: a hand-made spec's args are not the text of one JSON
                object; nothing is written.
        """
        batch = self._check_specs(specs)
        if not batch:
            return []
        if self.instrumentation is None:
            return await self._insert_many(conn, batch)
        with self.instrumentation.enqueuing(batch) as instrumented:
            return await self._insert_many(conn, instrumented)

    async def _insert_many(
        self, conn: psycopg.AsyncConnection[Any], batch: list[JobSpec]
    ) -> list[Job]:
        if self._capture is not None:
            return [self._capture(spec) for spec in batch]
        _check_connection(conn, sync=False)
        with _naming_bad_args(batch):
            rows = await _store.job_insert_many(
                conn, self.statements, batch, channel=self._notify_channel
            )
        return _jobs(rows, batch)

    @overload
    def enqueue_sync(
        self,
        conn: psycopg.Connection[Any],
        task: Task[P, Any],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Job: ...

    @overload
    def enqueue_sync(
        self, conn: psycopg.Connection[Any], task: str | TaskRef, /, **kwargs: Any
    ) -> Job: ...

    def enqueue_sync(
        self,
        conn: psycopg.Connection[Any],
        task: Task[Any, Any] | str | TaskRef,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Job:
        """`enqueue` for sync code (Django views, Flask handlers, scripts).

        Takes a sync `psycopg.Connection` and writes the job and its NOTIFY in
        the caller's transaction, exactly like `enqueue`.
        """
        spec = self._bind(task, args, kwargs)
        if self.instrumentation is None:
            return self._insert_sync(conn, spec)
        with self.instrumentation.enqueuing([spec]) as (instrumented,):
            return self._insert_sync(conn, instrumented)

    def _insert_sync(self, conn: psycopg.Connection[Any], spec: JobSpec) -> Job:
        if self._capture is not None:
            return self._capture(spec)
        _check_connection(conn, sync=True)
        row = _store.job_insert_sync(conn, self.statements, spec, channel=self._notify_channel)
        return _job(row, spec)

    def enqueue_many_sync(
        self, conn: psycopg.Connection[Any], specs: Iterable[JobSpec], /
    ) -> list[Job]:
        """`enqueue_many` for sync code, on a sync `psycopg.Connection`."""
        batch = self._check_specs(specs)
        if not batch:
            return []
        if self.instrumentation is None:
            return self._insert_many_sync(conn, batch)
        with self.instrumentation.enqueuing(batch) as instrumented:
            return self._insert_many_sync(conn, instrumented)

    def _insert_many_sync(self, conn: psycopg.Connection[Any], batch: list[JobSpec]) -> list[Job]:
        if self._capture is not None:
            return [self._capture(spec) for spec in batch]
        _check_connection(conn, sync=True)
        with _naming_bad_args(batch):
            rows = _store.job_insert_many_sync(
                conn, self.statements, batch, channel=self._notify_channel
            )
        return _jobs(rows, batch)

    @property
    def _notify_channel(self) -> str | None:
        """Where enqueue sends its NOTIFY: nowhere with notify off. (Jobs due later
        than `NOTIFY_WITHIN` send none: see `_store.job_insert`.)"""
        return self.channel if self.notify else None

    def _check_specs(self, specs: Iterable[JobSpec]) -> list[JobSpec]:
        batch = list(specs)
        check_specs(batch)
        return batch

    def _bind(
        self, task: Task[Any, Any] | str | TaskRef, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> JobSpec:
        """Validate and encode one call's arguments (a registered name uses its handler)."""
        if isinstance(task, str):
            registered = self._tasks.get(task)
            task = registered if registered is not None else TaskRef(name=task)
        if isinstance(task, Task):
            return task.bind(*args, **kwargs)
        if not isinstance(task, TaskRef):
            raise ConfigurationError(f"expected a Task, a task name or a TaskRef, got {task!r}")
        if args:
            raise PayloadError(task.name, "a task enqueued by name takes keyword arguments only")
        return task.bind(**kwargs)

    async def cancel(self, conn: psycopg.AsyncConnection[Any], *job_ids: int) -> CancelResult:
        """Cancel jobs on the caller's connection (in its transaction, if any).

        Waiting jobs become ``cancelled`` at once. For running jobs the worker
        running each is asked (by NOTIFY, and at its next heartbeat at the
        latest) to cancel the handler's scope; the job then ends ``cancelled``.
        Finished or unknown ids are left alone.

        Returns:
            Which ids were cancelled and which were asked to stop.

        Raises:
            ConfigurationError: an id is not an integer; nothing is done.
        """
        for job_id in job_ids:
            if isinstance(job_id, bool) or not isinstance(job_id, int):
                raise ConfigurationError(f"job ids are integers, got {job_id!r}")
        if self._capture_cancel is not None:
            return self._capture_cancel(job_ids)
        cancelled, requested = await _store.job_cancel(
            conn, self.statements, job_ids=job_ids, channel=self.channel, payload=CANCEL_PAYLOAD
        )
        return CancelResult(cancelled=tuple(cancelled), requested=tuple(requested))

    # -- database ------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow a connection from the queue's pool (autocommit) for the block.

        From a pool passed as ``Queue(pool=...)`` the connection is as that pool
        makes it: make its connections autocommit too, or open a transaction.

        Handy for scripts: ``async with queue.connection() as conn,
        conn.transaction(): await queue.enqueue(conn, ...)``.
        """
        if self._pool is not None:
            async with self._pool.connection() as conn:
                yield conn
            return
        if self._own_pool is None:
            self._own_pool = Pool(self.conninfo)
        async with self._own_pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def _dedicated_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for a one-off admin task, closed afterwards if it is our own."""
        if self._pool is not None:
            async with self._pool.connection() as conn:
                yield conn
            return
        async with await Connection[Any].connect(self.conninfo, autocommit=True) as conn:
            yield conn

    async def migrate(self) -> list[int]:
        """Create or upgrade the schema; safe to run from many processes at once.

        Returns:
            The migration versions this call applied (empty when up to date).
        """
        async with self._dedicated_connection() as conn:
            return await _store.migrate(conn, self.statements, self.schema)

    async def check_schema(self, conn: psycopg.AsyncConnection[Any] | None = None) -> int:
        """Verify the schema is installed and current; return its version.

        Raises:
            SchemaError: the schema is missing or older than this pgoutbox.
        """
        if conn is None:
            async with self._dedicated_connection() as own:
                return await self.check_schema(own)
        version = await _store.schema_version(conn, self.statements)
        latest = len(load_migrations(self.schema))
        if version is None:
            raise SchemaError(
                f"pgoutbox schema {self.schema!r} is not installed: run "
                "`python -m pgoutbox migrate <module>:<queue>` or `await queue.migrate()`"
            )
        if version < latest:
            raise SchemaError(
                f"pgoutbox schema {self.schema!r} is at version {version}, this pgoutbox needs "
                f"{latest}: run `python -m pgoutbox migrate <module>:<queue>` or "
                "`await queue.migrate()`"
            )
        return version

    async def status(self) -> QueueStatus:
        """Jobs per queue and state, the oldest due job's wait, and the registered workers.

        Workers whose heartbeat expired are listed until maintenance removes
        them (see `WorkerInfo.heartbeat_age`). Counting scans the jobs table:
        fine for an admin command, not for a hot path.

        Raises:
            SchemaError: the schema is missing or too old.
        """
        async with self._dedicated_connection() as conn:
            await self.check_schema(conn)
            return await _store.status(conn, self.statements)

    async def get_job(self, job_id: int) -> JobRecord | None:
        """The job with this id as stored now, or None if there is none.

        Raises:
            PgoutboxError: the queue is being captured (`pgoutbox.testing.capture`),
                whose job ids are not those of the database.
            SchemaError: the schema is older than version 11.
        """
        if self._capture is not None:
            raise PgoutboxError(
                f"{self!r} is being captured: its jobs are in memory, with ids of their own; "
                "read them from the capture (jobs.enqueued())"
            )
        async with self.connection() as conn:
            return await _store.job_get(conn, self.statements, job_id)

    async def aclose(self) -> None:
        """Close the queue's own pool (not a pool that was passed in)."""
        if self._own_pool is not None:
            pool, self._own_pool = self._own_pool, None
            await pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


_object_decoder = msgspec.json.Decoder(dict[str, Any])


@contextmanager
def _naming_bad_args(batch: list[JobSpec]) -> Iterator[None]:
    """Turn PostgreSQL's refusal of a batch for invalid JSON into a `PayloadError`
    naming the first spec whose args are not one JSON object."""
    try:
        yield
    except psycopg.DataError as ex:
        for n, spec in enumerate(batch):
            try:
                _object_decoder.decode(spec.args)
            except (msgspec.DecodeError, RecursionError):
                raise PayloadError(
                    spec.task,
                    f"the args of JobSpec number {n} in the batch are not one JSON object",
                ) from ex
        raise


def _check_connection(conn: object, *, sync: bool) -> None:
    """Refuse a connection of the other kind before anything runs on it (an async
    call would run a sync connection's statement, and commit it, before failing)."""
    if sync and not isinstance(conn, psycopg.Connection):
        raise ConfigurationError(
            f"enqueue_sync and enqueue_many_sync take a psycopg.Connection, got {conn!r}; "
            "use enqueue or enqueue_many with a psycopg.AsyncConnection"
        )
    if not sync and not isinstance(conn, psycopg.AsyncConnection):
        raise ConfigurationError(
            f"enqueue and enqueue_many take a psycopg.AsyncConnection, got {conn!r}; "
            "use enqueue_sync or enqueue_many_sync with a psycopg.Connection"
        )


def _job(row: _store.Inserted, spec: JobSpec) -> Job:
    """The handle of what enqueueing `spec` wrote, or of the job that held its key."""
    if row.holder is None:
        return Job(id=row.id, task=spec.task, queue=spec.queue, run_at=row.run_at)
    task, queue = row.holder
    return Job(id=row.id, task=task, queue=queue, run_at=row.run_at, duplicate=True)


def _jobs(rows: list[_store.Inserted], specs: list[JobSpec]) -> list[Job]:
    return [_job(row, spec) for row, spec in zip(rows, specs, strict=True)]
