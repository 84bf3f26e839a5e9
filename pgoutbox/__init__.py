"""pgoutbox: a transactional-outbox job queue for async Python on PostgreSQL.

Register ``async def`` handlers with `Queue.task`, enqueue jobs on your own
connection inside your own transaction with `Queue.enqueue`, and run them with
`Worker` (or ``python -m pgoutbox.worker``).
"""

from ._connection import Connection, connect
from ._job import Job, JobError, JobRecord, JobState
from ._pool import Pool
from ._queue import DEFAULT_SCHEMA, DSN_ENV, ConnectionSource, Queue, TaskRef
from ._task import DEFAULT_MAX_ATTEMPTS, DEFAULT_PRIORITY, DEFAULT_QUEUE, RetryPolicy, Task
from .errors import (
    ConfigurationError,
    IncompatiblePsycopgError,
    PayloadError,
    PgoutboxError,
    SchemaError,
    TaskNotFoundError,
)
from .worker import Worker, WorkerStatistics

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PRIORITY",
    "DEFAULT_QUEUE",
    "DEFAULT_SCHEMA",
    "DSN_ENV",
    "ConfigurationError",
    "Connection",
    "ConnectionSource",
    "IncompatiblePsycopgError",
    "Job",
    "JobError",
    "JobRecord",
    "JobState",
    "PayloadError",
    "PgoutboxError",
    "Pool",
    "Queue",
    "RetryPolicy",
    "SchemaError",
    "Task",
    "TaskNotFoundError",
    "TaskRef",
    "Worker",
    "WorkerStatistics",
    "connect",
]

__version__ = "0.1.0"
