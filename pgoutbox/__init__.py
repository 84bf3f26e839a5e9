"""pgoutbox: a transactional-outbox job queue for async Python on PostgreSQL.

Register ``async def`` handlers with `Queue.task`, enqueue jobs on your own
connection inside your own transaction with `Queue.enqueue`, and run them with
`Worker` (or ``python -m pgoutbox.worker``).
"""

from . import signals
from ._connection import Connection, connect
from ._context import JobContext, current_job
from ._job import (
    CancelResult,
    Job,
    JobError,
    JobRecord,
    JobSpec,
    JobState,
    QueueCounts,
    QueueStatus,
    WorkerInfo,
)
from ._pool import Pool
from ._queue import DEFAULT_SCHEMA, DSN_ENV, ConnectionSource, Queue
from ._task import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    RetryPolicy,
    Task,
    TaskRef,
)
from .errors import (
    ConfigurationError,
    IncompatiblePsycopgError,
    JobLostError,
    NoCurrentJobError,
    PayloadError,
    PgoutboxError,
    SchemaError,
    TaskNotFoundError,
)
from .instrumentation import Instrumentation
from .signals import Discard, JobSignal, Retry, Snooze
from .worker import Worker, WorkerStatistics

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PRIORITY",
    "DEFAULT_QUEUE",
    "DEFAULT_SCHEMA",
    "DSN_ENV",
    "CancelResult",
    "ConfigurationError",
    "Connection",
    "ConnectionSource",
    "Discard",
    "IncompatiblePsycopgError",
    "Instrumentation",
    "Job",
    "JobContext",
    "JobError",
    "JobLostError",
    "JobRecord",
    "JobSignal",
    "JobSpec",
    "JobState",
    "NoCurrentJobError",
    "PayloadError",
    "PgoutboxError",
    "Pool",
    "Queue",
    "QueueCounts",
    "QueueStatus",
    "Retry",
    "RetryPolicy",
    "SchemaError",
    "Snooze",
    "Task",
    "TaskNotFoundError",
    "TaskRef",
    "Worker",
    "WorkerInfo",
    "WorkerStatistics",
    "connect",
    "current_job",
    "signals",
]

__version__ = "0.1.0"
