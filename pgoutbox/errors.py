"""Errors pgoutbox raises to its callers.

The errors pgoutbox raises about your options, payloads, schema and jobs derive
from `PgoutboxError`, so one ``except`` catches them all; each message names
what was wrong and how to fix it.

```text
PgoutboxError
├── ConfigurationError        a Queue, task or Worker option is invalid
├── TaskNotFoundError         a task name is not registered (e.g. Queue.get_task)
├── PayloadError              arguments do not match the task's parameters
├── SchemaError               the database schema is missing or too old
├── JobLostError              a job's transactional completion was refused
├── NoCurrentJobError         current_job() called outside a handler
└── IncompatiblePsycopgError  the installed psycopg lacks an internal we need
```

Signals that a *handler* raises to pgoutbox (retry, snooze, discard) live in
`pgoutbox.signals`; they are not errors of pgoutbox's own.

Misusing an object raises a built-in exception instead: `RuntimeError` for
running a `Worker` twice, borrowing from a closed `Pool` or completing a job
twice with `JobContext.transaction`; `ValueError` for an invalid ``after`` of
`Retry` or `Snooze`. `testing.drain` raises `TimeoutError` when its time is up.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "IncompatiblePsycopgError",
    "JobLostError",
    "NoCurrentJobError",
    "PayloadError",
    "PgoutboxError",
    "SchemaError",
    "TaskNotFoundError",
]


class PgoutboxError(Exception):
    """Root of every error pgoutbox raises to its callers."""


class ConfigurationError(PgoutboxError, ValueError):
    """An option given to `Queue`, `Queue.task`, `Task.options`, `RetryPolicy`, `TaskRef`,
    `Pool` or `Worker` is invalid; a `JobSpec` is malformed; an enqueue got a connection of
    the wrong kind (sync or async); or no connection string is configured, or it is malformed.

    Raised before anything touches the database; the message names the option,
    the value and what is accepted.
    """


class TaskNotFoundError(PgoutboxError, LookupError):
    """A task name is not registered on this queue.

    `Queue.enqueue` accepts unknown names (the producer need not import the
    handler); this is raised where a handler is required, e.g. `Queue.get_task`.
    """


class PayloadError(PgoutboxError, ValueError):
    """The arguments given for a task do not match its parameters.

    Raised by `Queue.enqueue` before anything is written, and recorded as the
    failure of a job whose stored payload no longer decodes.

    Attributes:
        task: the task name.
        detail: what was wrong, naming the field (from msgspec).
    """

    def __init__(self, task: str, detail: str) -> None:
        super().__init__(f"invalid arguments for task {task!r}: {detail}")
        self.task = task
        self.detail = detail


class SchemaError(PgoutboxError):
    """The pgoutbox schema is missing, or older than this version of pgoutbox needs.

    Fix it with ``await queue.migrate()`` or ``python -m pgoutbox migrate``.
    """


class JobLostError(PgoutboxError):
    """The job is no longer running under this attempt, so its transaction was rolled back.

    Raised by `JobContext.transaction` when, at commit time, the job had been
    rescued from this worker (its heartbeat expired) or cancelled: the
    handler's database work in that transaction is not committed, so it takes
    effect at most once, in whichever attempt completes the job.
    """


class NoCurrentJobError(PgoutboxError, LookupError):
    """`current_job` was called outside a running handler."""


class IncompatiblePsycopgError(PgoutboxError, ImportError):
    """The installed psycopg lacks an internal that pgoutbox's connection layer uses.

    pgoutbox drives psycopg's connection generators itself to be safe under
    anyio cancellation on asyncio and trio; install a psycopg version within
    the range pinned in pgoutbox's requirements.
    """
