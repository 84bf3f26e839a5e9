"""The running job's context: who it is, and its transaction for exactly-once effects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import msgspec
import psycopg

from . import _store
from ._job import ClaimedJob
from ._queue import Queue
from .errors import JobLostError, NoCurrentJobError, PgoutboxError

__all__ = ["JobContext", "current_job"]

_current: ContextVar[JobContext] = ContextVar("pgoutbox_current_job")


class JobContext:
    """The job a handler is running, from `current_job`.

    Attributes:
        id: the job's id.
        task: the task name.
        queue: the queue it came from.
        attempt: this attempt's number (1 for the first run).
        max_attempts: the most attempts the job gets.
        instrumentation: the queue's instrumentation, if any.
    """

    def __init__(self, queue: Queue, job: ClaimedJob) -> None:
        self._queue = queue
        self.id = job.id
        self.task = job.task
        self.queue = job.queue
        self.attempt = job.attempt
        self._claim_id = job.claim_id
        self.max_attempts = job.max_attempts
        self._headers = job.headers
        self._completed = False
        self._lost = False
        self._open = False  # a transaction() block is running
        self.instrumentation = queue.instrumentation

    def __repr__(self) -> str:
        return f"<JobContext id={self.id} task={self.task!r} attempt={self.attempt}>"

    @property
    def headers(self) -> dict[str, str]:
        """Metadata enqueued with the job (e.g. trace context); empty if none."""
        if not self._headers:
            return {}
        return msgspec.json.decode(self._headers, type=dict[str, str])

    @property
    def lost(self) -> bool:
        """Whether `transaction` found the job no longer running under this attempt."""
        return self._lost

    @property
    def completed(self) -> bool:
        """Whether `transaction` already committed the job's completion."""
        return self._completed

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction that also completes the job: your effects and the completion
        commit together, or neither does.

        The connection comes from the queue's pool (`Queue.connection`). At the
        end of the block the job is marked ``completed`` in the same
        transaction, fenced by this attempt: if the job was rescued from this
        worker or cancelled meanwhile, everything is rolled back and
        `JobLostError` is raised. If the worker dies before the commit, nothing
        is visible and the job is retried.

        Raises:
            JobLostError: the job no longer runs under this attempt.
            PgoutboxError: a `transaction` block of this job is already open
                (use its connection), or the queue is being captured
                (`pgoutbox.testing.capture`), which has no database.
            RuntimeError: a `transaction` block already completed this job.
        """
        if self._completed:
            raise RuntimeError(f"job {self.id} was already completed by a transaction")
        if self._open:
            # A second block would complete the job on a connection of its own,
            # and the first one's writes would then roll back as lost.
            raise PgoutboxError(
                f"job {self.id}: current_job().transaction() is already open; use the "
                "connection it gave you"
            )
        if self._queue._capture is not None:
            raise PgoutboxError(
                "current_job().transaction() needs the database; it is not available while "
                "pgoutbox.testing.capture() records jobs in memory (use testing.isolated())"
            )
        self._open = True
        try:
            async with self._queue.connection() as conn:
                async with conn.transaction():
                    yield conn
                    if not await _store.job_complete_fenced(
                        conn,
                        self._queue.statements,
                        job_id=self.id,
                        attempt=self.attempt,
                        claim_id=self._claim_id,
                    ):
                        self._lost = True
                        raise JobLostError(
                            f"job {self.id} is no longer running under attempt {self.attempt} "
                            "(rescued or cancelled): its transaction was rolled back"
                        )
                self._completed = True
        finally:
            self._open = False


def current_job() -> JobContext:
    """The job the calling handler is running.

    Raises:
        NoCurrentJobError: called outside a handler run by a worker.
    """
    try:
        return _current.get()
    except LookupError:
        raise NoCurrentJobError(
            "current_job() works only inside a task handler run by a pgoutbox worker"
        ) from None


def enter(context: JobContext) -> None:
    """Make `context` the current job of this task (the worker calls this)."""
    _current.set(context)
