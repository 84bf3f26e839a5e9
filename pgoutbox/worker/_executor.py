"""The executor: runs one claimed job and decides its outcome."""

from __future__ import annotations

import logging
import time
import traceback
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import msgspec

from .._context import JobContext, enter
from .._job import ClaimedJob, JobError, JobState, Outcome
from .._task import Task
from ..errors import JobLostError, PayloadError
from ..signals import Discard, JobSignal, Retry, Snooze

__all__ = ["cancelled", "execute", "interrupted"]

logger = logging.getLogger("pgoutbox.worker")

MAX_TRACEBACK_CHARS: Final = 8000
"""The end of a traceback kept in a job's error history."""

_encode_error = msgspec.json.Encoder().encode


def _error(job: ClaimedJob, exc: BaseException, *, with_traceback: bool = True) -> str:
    """The error record of a failed attempt, as JSON that PostgreSQL's jsonb accepts
    whatever the exception holds: its text could otherwise fail the write of the
    whole batch of outcomes, on every worker that ran the job."""
    tb = _traceback(exc)[-MAX_TRACEBACK_CHARS:] if with_traceback else None
    try:
        message = str(exc)
    except Exception as ex:  # noqa: BLE001 (a broken __str__ must not crash the worker)
        message = f"(the exception's message could not be read: {type(ex).__name__})"
    record = JobError(
        attempt=job.attempt,
        at=datetime.now(UTC),
        type=storable(f"{type(exc).__module__}.{type(exc).__qualname__}"),
        message=storable(message),
        traceback=None if tb is None else storable(tb),
    )
    return _encode_error(record).decode()


def _traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception as ex:  # noqa: BLE001 (formatting calls the exception's __str__)
        return f"(the traceback could not be formatted: {type(ex).__name__})"


def storable(text: str) -> str:
    """`text` with what jsonb cannot hold replaced: NUL characters and lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\N{REPLACEMENT CHARACTER}")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="replace").decode()
    return text


def _context(job: ClaimedJob, **more: Any) -> dict[str, Any]:
    return {"job_id": job.id, "task": job.task, "queue": job.queue, "attempt": job.attempt, **more}


class JobTimeoutError(TimeoutError):
    """An attempt ran longer than its task's timeout and was cancelled."""


class WorkerShutdownError(Exception):
    """The worker stopped while the attempt ran; the job goes back to the queue."""


async def execute(
    task: Task[Any, Any], job: ClaimedJob, context: JobContext, cancel_scope: anyio.CancelScope
) -> Outcome | None:
    """Run `job` with `task`'s handler and return how the attempt ended.

    `cancel_scope` is the scope the caller runs the job in, already entered;
    it is cancelled when someone cancels this job. Returns None when there is
    nothing left to write: the handler completed the job in its own
    transaction, or lost it. The handler's exceptions never escape;
    cancellation does, also the cancellation of this job (then
    `cancel_scope.cancel_called` is true: use `cancelled` for the outcome;
    otherwise the caller is being cancelled: use `interrupted`).
    """
    instrumentation = context.instrumentation
    if instrumentation is None:
        return await _attempt(task, job, context)
    started = time.monotonic()
    with instrumentation.executing(context):
        try:
            outcome = await _attempt(task, job, context)
        except anyio.get_cancelled_exc_class():
            if cancel_scope.cancel_called and not context.lost:
                state = JobState.COMPLETED if context.completed else JobState.CANCELLED
                instrumentation.job_finished(context, state, time.monotonic() - started)
            raise
        if not context.lost:  # a lost attempt's outcome belongs to the attempt that won
            state = JobState.COMPLETED if outcome is None else outcome.state
            instrumentation.job_finished(context, state, time.monotonic() - started)
    return outcome


async def _attempt(task: Task[Any, Any], job: ClaimedJob, context: JobContext) -> Outcome | None:
    try:
        kwargs = task.decode_args(job.args)
    except PayloadError as ex:
        # Not the error's text: msgspec's message may quote a value of the payload.
        logger.error(  # noqa: TRY400 (see above)
            "job %s cannot run: its arguments do not fit the handler's parameters (the "
            "job's error history has the details)",
            job.id,
            extra=_context(job, event="job.undecodable"),
        )
        return _outcome(job, JobState.FAILED, error=_error(job, ex))
    started = time.monotonic()
    debug = logger.isEnabledFor(logging.DEBUG)  # spare the hot path building `extra`
    if debug:
        logger.debug("job %s started", job.id, extra=_context(job, event="job.started"))
    error: Exception | None = None
    enter(context)
    try:
        if task.timeout is None:
            await task.fn(**kwargs)
        else:
            with anyio.move_on_after(task.timeout) as timeout_scope:
                await task.fn(**kwargs)
            if timeout_scope.cancelled_caught:
                error = JobTimeoutError(f"attempt exceeded the task's timeout of {task.timeout} s")
    except Exception as ex:  # noqa: BLE001 (a handler's failure is an outcome, not a crash)
        error = ex
    duration = time.monotonic() - started
    if context.completed:
        if error is not None:  # the job stays completed: its effects committed with it
            logger.error(
                "job %s raised after its transaction completed it: %s",
                job.id,
                type(error).__name__,
                exc_info=error,
                extra=_context(job, event="job.failed_after_commit", duration=duration),
            )
        return None
    if error is None:
        if debug:
            logger.debug(
                "job %s completed",
                job.id,
                extra=_context(job, event="job.completed", duration=duration),
            )
        return _outcome(job, JobState.COMPLETED)
    return _failure(task, job, error, duration)


def _failure(
    task: Task[Any, Any], job: ClaimedJob, error: Exception, duration: float
) -> Outcome | None:
    """The outcome of an attempt that raised `error` (or a signal)."""
    if isinstance(error, JobLostError):
        logger.warning(
            "job %s was lost to a rescue or cancellation; its transaction rolled back",
            job.id,
            extra=_context(job, event="job.lost", duration=duration),
        )
        return None
    if isinstance(error, Snooze):
        logger.info(
            "job %s snoozed for %.1f s",
            job.id,
            error.after,
            extra=_context(job, event="job.snoozed", delay=error.after),
        )
        return _outcome(job, JobState.SCHEDULED, delay=error.after, extra_attempts=1)
    # The job's own max_attempts decides: a producer may have set it (TaskRef).
    attempts_left = job.attempt < job.max_attempts
    if isinstance(error, Retry):
        retry = attempts_left
        delay = error.after if error.after is not None else task.retry.interval(job.attempt)
    else:
        retry = attempts_left and not isinstance(error, Discard) and task.retry.retries(error)
        delay = task.retry.interval(job.attempt)
    if retry:
        logger.warning(
            "job %s attempt %s failed, retrying in %.1f s: %s",
            job.id,
            job.attempt,
            delay,
            type(error).__name__,
            exc_info=not isinstance(error, JobSignal) and error,
            extra=_context(job, event="job.retrying", duration=duration, delay=delay),
        )
        return _outcome(job, JobState.RETRYABLE, delay=delay, error=_error(job, error))
    logger.error(
        "job %s failed for good on attempt %s: %s",
        job.id,
        job.attempt,
        type(error).__name__,
        exc_info=not isinstance(error, JobSignal) and error,
        extra=_context(job, event="job.failed", duration=duration),
    )
    return _outcome(job, JobState.FAILED, error=_error(job, error))


def _outcome(
    job: ClaimedJob,
    state: JobState,
    *,
    delay: float | None = None,
    error: str | None = None,
    extra_attempts: int = 0,
) -> Outcome:
    """How `job`'s attempt ended, fenced by its attempt and claim."""
    return Outcome(job.id, job.attempt, state, delay, error, extra_attempts, job.claim_id)


def cancelled(job: ClaimedJob, context: JobContext) -> Outcome | None:
    """The outcome of an attempt cancelled on request while its handler ran: None
    if the handler had completed the job in its own transaction already."""
    if context.completed:
        return None
    logger.info("job %s cancelled", job.id, extra=_context(job, event="job.cancelled"))
    return _outcome(job, JobState.CANCELLED)


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
    # The interrupted attempt is given back (max_attempts + 1; attempt numbers
    # keep growing, so fences stay sound): a deploy must not use up a job.
    return _outcome(job, JobState.AVAILABLE, delay=0.0, error=error, extra_attempts=1)
