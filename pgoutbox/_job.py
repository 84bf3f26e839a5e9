"""The records that cross pgoutbox's boundary: jobs as stored, claimed and enqueued."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

import msgspec

__all__ = [
    "NOTIFY_WITHIN",
    "CancelResult",
    "ClaimedJob",
    "Job",
    "JobError",
    "JobRecord",
    "JobSpec",
    "JobState",
    "Outcome",
    "QueueCounts",
    "QueueStatus",
    "WorkerInfo",
]


NOTIFY_WITHIN: Final = 60.0
"""Seconds: a job due within this long of the statement that enqueues it sends a
NOTIFY (unless the queue's `notify` is off). A worker woken for a job that is
not due yet learns its due time from the fetch and sleeps until then, so the
job starts on time even in a worker that polls rarely. A job due later is found
by a worker's poll before it is due, as long as the worker's `poll_interval` is
no longer."""


class JobState(StrEnum):
    """Where a job is in its lifecycle.

    ``scheduled`` → ``available`` → ``running`` → ``completed``, or
    ``retryable`` → … → ``failed``; ``cancelled`` by `Queue.cancel`. A
    ``scheduled`` or ``retryable`` job becomes ``available`` at the first fetch
    after its ``run_at`` by a worker that handles its queue and task.
    """

    SCHEDULED = "scheduled"
    """Enqueued with a delay, or snoozed; waits for ``run_at``. Or due, and set
    aside by a fetch because no registered worker runs its task in its queue;
    waits for a worker that does."""
    AVAILABLE = "available"
    """Ready to run now."""
    RUNNING = "running"
    """Claimed by a worker."""
    RETRYABLE = "retryable"
    """An attempt failed; waits for ``run_at`` to be retried."""
    COMPLETED = "completed"
    """The handler returned."""
    FAILED = "failed"
    """Out of attempts or not retryable; kept with its errors (the dead-letter view)
    until the worker's ``failed_retention`` has passed."""
    CANCELLED = "cancelled"
    """Cancelled before it finished."""


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A handle on an enqueued job, returned by `Queue.enqueue`.

    Attributes:
        id: the job's id, unique in its schema.
        task: the task name.
        queue: the queue it waits in.
        run_at: when it becomes available (the database's clock).
        duplicate: True if the job was not enqueued because an unfinished job
            held its unique key; `id` and `run_at` are then that job's.
    """

    id: int
    task: str
    queue: str
    run_at: datetime
    duplicate: bool = False


class JobError(msgspec.Struct, frozen=True, kw_only=True):
    """One failed attempt, as recorded in a job's error history.

    Attributes:
        attempt: the attempt that failed (1 for the first run).
        at: when it failed (UTC; the worker's clock, or the database's for a rescue).
        type: the exception's qualified type name.
        message: ``str()`` of the exception.
        traceback: the formatted traceback, if any.
    """

    attempt: int
    at: datetime
    type: str
    message: str
    traceback: str | None = None


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A job row as stored, returned by `Queue.get_job`.

    Attributes:
        id: the job's id.
        queue: the queue it waits in.
        task: the task name.
        args: the encoded arguments (JSON text).
        priority: higher runs first.
        state: where the job is in its lifecycle.
        attempt: how many times it was claimed.
        max_attempts: the most attempts it gets.
        run_at: when it is (or was) due.
        created_at: when it was enqueued.
        attempted_at: when it was last claimed.
        finished_at: when it reached a final state.
        errors: the error of every failed attempt, oldest first.
        key: its unique key, or None.
    """

    id: int
    queue: str
    task: str
    args: str
    priority: int
    state: JobState
    attempt: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    attempted_at: datetime | None
    finished_at: datetime | None
    errors: tuple[JobError, ...]
    key: str | None = None


class ClaimedJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job a worker has claimed and is about to run (internal to the worker)."""

    id: int
    queue: str
    task: str
    args: str
    priority: int
    attempt: int
    max_attempts: int
    headers: str | None = None
    claim_id: str | None = None
    """The fetch that claimed it: with the attempt, the fence of its outcome."""


class Outcome(msgspec.Struct, frozen=True):
    """How one attempt ended, as the completer writes it (internal to the worker).

    `delay` is set when the job goes back to waiting (seconds from now);
    `error` is a JSON-encoded `JobError` when the attempt failed;
    `extra_attempts` raises max_attempts (a snooze does not spend an attempt);
    `claim_id` is the claim of the attempt (None: fenced by attempt alone).
    """

    id: int
    attempt: int
    state: JobState
    delay: float | None = None
    error: str | None = None
    extra_attempts: int = 0
    claim_id: str | None = None


class CancelResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `Queue.cancel` did.

    Attributes:
        cancelled: ids of waiting jobs that are now ``cancelled``.
        requested: ids of running jobs whose worker was asked to cancel them;
            each ends ``cancelled`` once its handler stops (or ``completed``,
            if it finished first).
    """

    cancelled: tuple[int, ...]
    requested: tuple[int, ...]


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A job ready to be enqueued: a task, its encoded arguments and options.

    Made by `Task.bind` or `TaskRef.bind` (which validate the arguments) and
    written by `Queue.enqueue_many`.

    Attributes:
        task: the task name.
        queue: the queue it will wait in.
        priority: higher runs first.
        max_attempts: attempts in all.
        args: the arguments, encoded as JSON.
        delay: seconds from now before it may run.
        run_at: an aware datetime before which it does not run.
        headers: string metadata carried with the job (e.g. trace context).
        key: a unique key: no other job with it is enqueued while this one is
            unfinished.
    """

    task: str
    queue: str
    priority: int
    max_attempts: int
    args: str
    delay: float = 0.0
    run_at: datetime | None = None
    headers: dict[str, str] | None = None
    key: str | None = None

    def due_now(self) -> bool:
        """Whether the job may run at once (it is then inserted ``available``)."""
        return self.delay <= 0 and (self.run_at is None or self.run_at <= datetime.now(UTC))


class QueueCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Jobs of one queue by state, from `Queue.status`.

    Attributes:
        queue: the queue name.
        counts: jobs per state (states with no jobs are absent).
        oldest_due_age: seconds the oldest due, unclaimed job has waited, or None.
    """

    queue: str
    counts: dict[JobState, int]
    oldest_due_age: float | None


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A registered worker, from `Queue.status` (alive unless its heartbeat is old).

    Attributes:
        id: the worker's id.
        hostname: where it runs.
        pid: its process id there.
        queues: the queues it takes jobs from.
        concurrency: the most jobs it runs at once.
        started_at: when it registered.
        heartbeat_age: seconds since its last heartbeat.
        running: jobs it holds now.
    """

    id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    started_at: datetime
    heartbeat_age: float
    running: int


class QueueStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of an installation, from `Queue.status`.

    Attributes:
        queues: job counts per queue.
        workers: the registered workers.
    """

    queues: tuple[QueueCounts, ...]
    workers: tuple[WorkerInfo, ...]
