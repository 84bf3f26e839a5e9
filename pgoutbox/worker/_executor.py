"""The executor: runs one claimed job and decides its outcome."""

from __future__ import annotations

import logging
import time
import traceback
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import msgspec

from .._job import ClaimedJob, JobError, JobState, Outcome
from .._task import Task
from ..errors import PayloadError

__all__ = ["execute", "interrupted"]

logger = logging.getLogger("pgoutbox.worker")

MAX_TRACEBACK_CHARS: Final = 8000
"""The end of a traceback kept in a job's error history."""

_encode_error = msgspec.json.Encoder().encode


def _error(job: ClaimedJob, exc: BaseException, *, with_traceback: bool = True) -> str:
    tb = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:] if with_traceback else None
    record = JobError(
        attempt=job.attempt,
        at=datetime.now(UTC),
        type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        traceback=tb,
    )
    return _encode_error(record).decode()


def _context(job: ClaimedJob, **more: Any) -> dict[str, Any]:
    return {"job_id": job.id, "task": job.task, "queue": job.queue, "attempt": job.attempt, **more}


class JobTimeoutError(TimeoutError):
    """An attempt ran longer than its task's timeout and was cancelled."""


class WorkerShutdownError(Exception):
    """The worker stopped while the attempt ran; the job goes back to the queue."""


async def execute(task: Task[Any, Any], job: ClaimedJob) -> Outcome:
    """Run `job` with `task`'s handler and return how the attempt ended.

    The handler's exceptions never escape; cancellation of the caller does
    (use `interrupted` for the outcome then).
    """
    try:
        kwargs = task.decode_args(job.args)
    except PayloadError as ex:
        logger.exception(
            "job %s cannot run: its arguments do not decode",
            job.id,
            extra=_context(job, event="job.undecodable"),
        )
        return Outcome(job.id, job.attempt, JobState.FAILED, error=_error(job, ex))
    started = time.monotonic()
    logger.debug("job %s started", job.id, extra=_context(job, event="job.started"))
    error: Exception | None = None
    try:
        with anyio.move_on_after(task.timeout) as scope:
            await task.fn(**kwargs)
    except Exception as ex:  # noqa: BLE001 (a handler's failure is an outcome, not a crash)
        error = ex
    else:
        if scope.cancelled_caught:
            error = JobTimeoutError(f"attempt exceeded the task's timeout of {task.timeout} s")
    duration = time.monotonic() - started
    if error is None:
        logger.debug(
            "job %s completed",
            job.id,
            extra=_context(job, event="job.completed", duration=duration),
        )
        return Outcome(job.id, job.attempt, JobState.COMPLETED)
    return _failure(task, job, error, duration)


def _failure(task: Task[Any, Any], job: ClaimedJob, error: Exception, duration: float) -> Outcome:
    """The outcome of an attempt that raised `error`: retry later, or fail for good."""
    # The job's own max_attempts decides: a producer may have set it (TaskRef).
    if job.attempt < job.max_attempts and task.retry.retries(error):
        delay = task.retry.interval(job.attempt)
        logger.warning(
            "job %s attempt %s failed, retrying in %.1f s: %s",
            job.id,
            job.attempt,
            delay,
            type(error).__name__,
            exc_info=error,
            extra=_context(job, event="job.retrying", duration=duration, delay=delay),
        )
        return Outcome(
            job.id, job.attempt, JobState.RETRYABLE, delay=delay, error=_error(job, error)
        )
    logger.error(
        "job %s failed for good on attempt %s: %s",
        job.id,
        job.attempt,
        type(error).__name__,
        exc_info=error,
        extra=_context(job, event="job.failed", duration=duration),
    )
    return Outcome(job.id, job.attempt, JobState.FAILED, error=_error(job, error))


def interrupted(job: ClaimedJob) -> Outcome:
    """The outcome of an attempt cut short by the worker stopping: run it again soon."""
    logger.warning(
        "job %s interrupted by shutdown, returning it to the queue",
        job.id,
        extra=_context(job, event="job.interrupted"),
    )
    error = _error(
        job, WorkerShutdownError("the worker stopped during this attempt"), with_traceback=False
    )
    return Outcome(job.id, job.attempt, JobState.AVAILABLE, delay=0.0, error=error)
