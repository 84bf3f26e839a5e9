"""The worker: a producer, executors, a completer and a listener under one task group."""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final

import anyio
import msgspec
import psycopg

from .. import _store
from .._connection import Connection
from .._context import JobContext
from .._job import ClaimedJob
from .._queue import Queue
from .._task import MAX_DELAY, Task, check_seconds, seconds_in_range, validate_name
from ..errors import ConfigurationError
from ._completer import Completer
from ._executor import cancelled, execute, interrupted
from ._heartbeat import (
    DEFAULT_COMPLETED_RETENTION,
    DEFAULT_FAILED_RETENTION,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAINTENANCE_INTERVAL,
    Heartbeat,
)
from ._link import RECONNECT_ON, Link
from ._listener import DEFAULT_PROBE_INTERVAL, Listener
from ._producer import Feed, Producer, Slots
from ._vacuum import DEFAULT_VACUUM_THRESHOLD, Vacuumer
from ._wakeup import Wakeup

__all__ = [
    "DEFAULT_COMPLETED_RETENTION",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_FAILED_RETENTION",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAINTENANCE_INTERVAL",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_VACUUM_THRESHOLD",
    "Worker",
    "WorkerStatistics",
]

logger = logging.getLogger("pgoutbox.worker")

DEFAULT_CONCURRENCY: Final = 10
"""Jobs a worker runs at once unless told otherwise."""

DEFAULT_POLL_INTERVAL: Final = 1.0
"""Seconds between fetches when no notification arrives (the safety net for NOTIFY)."""

DEFAULT_SHUTDOWN_TIMEOUT: Final = 25.0
"""Seconds running jobs get to finish after `Worker.stop` before they are cancelled."""

MIN_SESSION_IDLE_TIMEOUT: Final = 60.0
"""Seconds of idleness after which the server ends the fetch/ack connection's session
(from PostgreSQL 14 on), at least; ten heartbeat intervals or the heartbeat timeout if
longer (a worker stalled that long is declared dead anyway)."""

CLEANUP_TIMEOUT: Final = 10.0
"""Seconds allowed for the final flush of outcomes and unregistering at shutdown."""

START_TIMEOUT: Final = 10.0
"""Seconds the schema check and the registration may take before the connection
is deemed dead (then retried)."""


_NO_RUN: Final = object()
"""Stands for "no run of this job here" in `Worker._newest_claim` look-ups."""


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a worker's counters, from `Worker.statistics`.

    Attributes:
        worker_id: the worker's id (its row in the ``workers`` table).
        concurrency: the most jobs it runs at once.
        running: jobs running now.
        claimed: jobs claimed since start.
        fetches: fetch statements run since start.
        listening: whether its LISTEN is in place now.
        rescued: jobs it rescued from workers whose heartbeat expired.
        pruned: finished jobs it deleted past their retention.
        vacuums: vacuums of the jobs table it ran (see ``vacuum_threshold``).
        fetch_connection_pids: backend pid of each fetch/ack connection it opened.
        listen_connection_pids: backend pid of each LISTEN connection it opened.
    """

    worker_id: str
    concurrency: int
    running: int
    claimed: int
    fetches: int
    listening: bool
    rescued: int
    pruned: int
    vacuums: int
    fetch_connection_pids: tuple[int, ...]
    listen_connection_pids: tuple[int, ...]


class Worker:
    """Runs the jobs of a `Queue`'s registered tasks.

    Args:
        queue: the queue whose tasks to run.
        concurrency: the most jobs run at once (and claimed per fetch).
        queues: the queues to take jobs from; defaults to every queue a
            registered task uses.
        poll_interval: seconds between fetches when no notification arrives.
        shutdown_timeout: seconds running jobs get after `stop` before they are
            cancelled and returned to the queue (`math.inf`: never; the
            command line's second signal, or cancelling `run`, still does).
        probe_interval: seconds between checks that the LISTEN connection
            still answers.
        heartbeat_interval: seconds between heartbeats (and checks for
            cancel requests when no NOTIFY arrives).
        heartbeat_timeout: seconds without a heartbeat after which other
            workers deem this one dead and retry its jobs. Keep it well above
            the longest time the event loop may be blocked.
        maintenance_interval: seconds between maintenance rounds: rescuing dead
            workers' jobs and pruning finished ones (one worker at a time).
        completed_retention: seconds completed and cancelled jobs are kept.
            0 deletes each job as it completes, in the statement that records
            its completion: the fastest setting (no second row version, no
            index entries to add), for when nobody looks at completed jobs.
        failed_retention: seconds failed jobs are kept (the dead-letter view).
        vacuum_threshold: dead row versions in the jobs table at which a
            maintenance round vacuums it, on a connection opened for that
            (one worker at a time; 0 never does). Every claimed job leaves a
            dead entry at the head of the index that fetches scan, and each
            fetch reads past them until a vacuum removes them: about 0.85 ms
            more per fetch per 100,000 jobs on a 2-core machine. Autovacuum
            comes at most once per ``autovacuum_naptime``. The role must be a
            member of the table's or the database's owner, a superuser, or
            (PostgreSQL 17 and later) hold ``MAINTAIN`` on the table;
            otherwise nothing is done.
        prepared_statements: let the fetch/ack connection use server-side
            prepared statements (faster). Turn off behind a pooler in
            transaction mode that cannot keep them (PgBouncer before 1.21, or
            without ``max_prepared_statements``).

    A worker holds two connections: one for fetching and acknowledging, one
    for LISTEN (and a third while it vacuums the jobs table). It claims only
    the tasks registered on `queue`, so during a rolling deploy an old worker
    never takes a task it does not know.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queues: Sequence[str] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        maintenance_interval: float = DEFAULT_MAINTENANCE_INTERVAL,
        completed_retention: float = DEFAULT_COMPLETED_RETENTION,
        failed_retention: float = DEFAULT_FAILED_RETENTION,
        vacuum_threshold: int = DEFAULT_VACUUM_THRESHOLD,
        prepared_statements: bool = True,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        for option, value in (
            ("poll_interval", poll_interval),
            ("probe_interval", probe_interval),
            ("heartbeat_interval", heartbeat_interval),
            ("heartbeat_timeout", heartbeat_timeout),
            ("maintenance_interval", maintenance_interval),
        ):
            if not seconds_in_range(value) or not value > 0:
                raise ConfigurationError(
                    f"{option} must be a number of seconds above 0 (at most {MAX_DELAY:.0f}), "
                    f"got {value!r}"
                )
        # Infinite: running jobs are never cut short by a stop (a second signal still does).
        if not (
            (isinstance(shutdown_timeout, float) and shutdown_timeout == math.inf)
            or seconds_in_range(shutdown_timeout)
        ) or not (shutdown_timeout > 0):
            raise ConfigurationError(
                f"shutdown_timeout must be a number of seconds above 0, or math.inf, "
                f"got {shutdown_timeout!r}"
            )
        for option, value in (
            ("completed_retention", completed_retention),
            ("failed_retention", failed_retention),
        ):
            # At most a century: to keep finished jobs for good, that is long enough.
            check_seconds(option, value)
        if (
            isinstance(vacuum_threshold, bool)
            or not isinstance(vacuum_threshold, int)
            or vacuum_threshold < 0
        ):
            raise ConfigurationError(
                f"vacuum_threshold must be an integer >= 0, got {vacuum_threshold!r}"
            )
        if not heartbeat_timeout >= 3 * heartbeat_interval:
            raise ConfigurationError(
                f"heartbeat_timeout ({heartbeat_timeout!r} s) must be at least three "
                f"heartbeat intervals ({heartbeat_interval!r} s)"
            )
        if not queue.tasks:
            raise ConfigurationError(f"{queue!r} has no registered tasks: nothing to run")
        if isinstance(queues, str):
            raise ConfigurationError(
                f"queues must be a list of queue names, got the string {queues!r}; "
                f"write [{queues!r}]"
            )
        self.queue = queue
        self.concurrency = concurrency
        self.queues = sorted(
            {validate_name("queue", q) for q in queues}
            if queues is not None
            else {t.queue for t in queue.tasks.values()}
        )
        if not self.queues:
            raise ConfigurationError("queues must name at least one queue")
        self.poll_interval = poll_interval
        self.shutdown_timeout = shutdown_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.id = str(uuid.uuid4())
        self._tasks: dict[str, Task[Any, Any]] = dict(queue.tasks)
        self._slots = Slots(concurrency)
        self._wakeup = Wakeup()
        self._cancel_hint = Wakeup()
        # By (job id, attempt, claim): after a rescue one worker may run two
        # attempts of a job, and after a claim lost to a server crash two runs
        # of the same attempt.
        self._cancel_scopes: dict[tuple[int, int, str | None], anyio.CancelScope] = {}
        # The claim of the newest run of each job running here: an older run's
        # outcome is dropped (see `_run_job`).
        self._newest_claim: dict[int, str | None] = {}

        def conninfo() -> str:  # read at each connect: the DSN may be set after this
            return queue.conninfo

        self._listener = Listener(
            conninfo,
            queue.channel,
            self.queues,
            self._wakeup,
            cancel_hint=self._cancel_hint,
            probe_interval=probe_interval,
            instrumentation=queue.instrumentation,
        )
        self._link = Link(
            conninfo, on_failure=self._listener.reset, prepared_statements=prepared_statements
        )
        keep_completed = completed_retention > 0
        vacuum_due = Wakeup()
        self._completer = Completer(
            self._link,
            queue.statements,
            capacity=concurrency,
            keep_completed=keep_completed,
            instrumentation=queue.instrumentation,
            rerun=self._wakeup,
        )
        self._heartbeat = Heartbeat(
            self._link,
            queue,
            self.id,
            register=self._register,
            on_cancel=self._cancel_running,
            cancel_hint=self._cancel_hint,
            interval=heartbeat_interval,
            maintenance_interval=maintenance_interval,
            completed_retention=completed_retention,
            failed_retention=failed_retention,
            vacuum_threshold=vacuum_threshold,
            vacuum_due=vacuum_due,
        )
        self._vacuumer = Vacuumer(conninfo, queue, self.id, vacuum_due)
        self._producer = Producer(
            self._link,
            queue,
            worker_id=self.id,
            queues=self.queues,
            tasks=sorted(self._tasks),
            slots=self._slots,
            wakeup=self._wakeup,
            poll_interval=poll_interval,
            completer=self._completer,
            keep_completed=keep_completed,
            # The heartbeat uses the connection every heartbeat_interval: a
            # session idle this long has lost its client.
            session_idle_timeout=max(
                MIN_SESSION_IDLE_TIMEOUT, 10 * heartbeat_interval, heartbeat_timeout
            ),
        )
        self._producer_scope: anyio.CancelScope | None = None
        self._start_scope: anyio.CancelScope | None = None
        self._stopping = False
        self._started = False
        self._registered = False

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of the worker's counters."""
        return WorkerStatistics(
            worker_id=self.id,
            concurrency=self.concurrency,
            running=self._slots.used,
            claimed=self._producer.claimed,
            fetches=self._producer.fetches,
            listening=self._listener.listening,
            rescued=self._heartbeat.rescued,
            pruned=self._heartbeat.pruned,
            vacuums=self._vacuumer.vacuums,
            fetch_connection_pids=tuple(self._link.pids),
            listen_connection_pids=tuple(self._listener.pids),
        )

    async def wait_listening(self) -> None:
        """Block until the worker's LISTEN is in place (so a NOTIFY will wake it).

        Useful in tests and health checks; bound it with a timeout of your own.
        """
        await self._listener.wait_listening()

    def stop(self) -> None:
        """Stop fetching; let running jobs finish within `shutdown_timeout`, then return.

        Cancelling the scope around `run` instead stops at once: running jobs
        are cancelled and returned to the queue.
        """
        self._stopping = True
        if self._start_scope is not None:
            self._start_scope.cancel()  # still connecting: nothing runs yet
        if self._producer_scope is not None:
            self._producer_scope.cancel()

    async def run(self) -> None:
        """Run jobs until `stop` is called or the surrounding scope is cancelled.

        Raises:
            SchemaError: the schema is missing or too old (nothing was run).
            ConfigurationError: the queue has no connection string, or a malformed one
                (nothing was run).
            RuntimeError: this worker already ran.
        """
        if self._started:
            raise RuntimeError("a Worker runs once; create a new one")
        self._started = True
        try:
            with anyio.CancelScope() as self._start_scope:
                if not self._stopping:
                    await self._start()
            self._start_scope = None
            if self._registered:  # not stopped while still connecting
                await self._serve()
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()
        logger.info("worker stopped", extra={"event": "worker.stopped", "worker_id": self.id})

    async def _serve(self) -> None:
        """Run the services and the executors until stopped, then drain."""
        logger.info(
            "worker started",
            extra={
                "event": "worker.started",
                "worker_id": self.id,
                "queues": self.queues,
                "concurrency": self.concurrency,
            },
        )
        async with anyio.create_task_group() as services:
            await services.start(self._listener.run)
            await services.start(self._heartbeat.run)
            await services.start(self._vacuumer.run)
            async with anyio.create_task_group() as acks:
                await acks.start(self._completer.run)
                # One long-lived executor task per slot, fed by the producer:
                # cheaper than a new task (and cancel scope) per job.
                feed = Feed()
                try:
                    async with anyio.create_task_group() as jobs:
                        for _ in range(self.concurrency):
                            jobs.start_soon(self._execute, feed)
                        with anyio.CancelScope() as self._producer_scope:
                            if not self._stopping:
                                await self._producer.run(feed.put)
                        await self._drain(jobs)
                finally:
                    self._completer.close()
                acks.cancel_scope.deadline = anyio.current_time() + CLEANUP_TIMEOUT
            services.cancel_scope.cancel()

    async def _start(self) -> None:
        """Connect, check the schema and register, retrying after connection failures
        (a read-only server too: after a failover the next connection may reach the
        new primary)."""
        while True:
            conn = await self._link.get()
            try:
                # Shielded: a stop that came now would leave the worker unsure
                # whether its row was written. It waits for the reply instead.
                with anyio.fail_after(START_TIMEOUT, shield=True):
                    await self.queue.check_schema(conn)
                    self._registered = True  # perhaps: unregistering is harmless
                    await self._register(conn)
            except RECONNECT_ON as ex:
                await self._link.failed(conn, ex)
                continue
            self._link.succeeded()
            return

    async def _register(self, conn: Connection[Any]) -> None:
        await _store.worker_register(
            conn,
            self.queue.statements,
            worker_id=self.id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            tasks=sorted(self._tasks),
            concurrency=self.concurrency,
            heartbeat_timeout=self.heartbeat_timeout,
        )

    def _cancel_running(self, job_ids: Iterable[int]) -> None:
        """Cancel the handlers of these jobs, if they run here."""
        wanted = set(job_ids)
        for (job_id, _attempt, _claim), scope in self._cancel_scopes.items():
            if job_id in wanted and not scope.cancel_called:
                logger.info(
                    "cancelling job %s on request",
                    job_id,
                    extra={"event": "job.cancelling", "job_id": job_id, "worker_id": self.id},
                )
                scope.cancel()

    async def _execute(self, feed: Feed) -> None:
        """An executor: runs the jobs the producer hands over, one at a time, until
        cancelled.

        Its jobs share one cancel scope, which lets `_cancel_running` stop a
        handler: entering and leaving an anyio scope costs about 3 µs on
        asyncio, half of an executor's own time per short job. The scope is
        cancelled only for the job whose handler runs in it (`_run_job`
        registers it for that job alone), and the executor leaves it for a new
        one before it takes the next job. A cancel that arrives after the
        handler's last checkpoint thus cancels nothing, as with a scope per job.
        """
        slots = self._slots
        while True:
            with anyio.CancelScope() as scope:
                while not scope.cancel_called:
                    job = await feed.get()
                    if slots.waking:
                        # The producer can fetch now: let it send its fetch before
                        # this executor runs the next job, so the database works on
                        # the next batch while this one runs.
                        await anyio.lowlevel.checkpoint()
                    await self._run_job(job, scope)

    async def _run_job(self, job: ClaimedJob, scope: anyio.CancelScope) -> None:
        """Run `job` in `scope` (its executor's, entered) and queue its outcome."""
        key = (job.id, job.attempt, job.claim_id)
        self._cancel_scopes[key] = scope
        self._newest_claim[job.id] = job.claim_id
        context = JobContext(self.queue, job)
        try:
            try:
                outcome = await execute(self._tasks[job.task], job, context, scope)
            except anyio.get_cancelled_exc_class():
                if scope.cancel_called:  # this job was cancelled on request
                    outcome = cancelled(job, context)
                    if outcome is not None and self._is_newest(job):
                        self._completer.put_anyway(outcome)
                elif self._is_newest(job):  # the worker is stopping
                    # If this outcome is never written, unregistering the worker
                    # at cleanup returns the job to the queue all the same.
                    self._completer.put_anyway(interrupted(job))
                raise
            if outcome is not None and not self._is_newest(job):
                outcome = None
            if outcome is not None and not self._completer.put_nowait(outcome):
                # The completer is behind: wait (backpressure), shielded so that
                # a stopping worker keeps the outcome, and bounded so that it
                # can stop; then queue it all the same. Dropped, it would leave
                # the job running under this live worker. Each executor holds
                # one outcome at most, so this overflow is bounded.
                with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True) as waited:
                    await self._completer.put(outcome)
                if waited.cancelled_caught:
                    self._completer.put_anyway(outcome)
        finally:
            del self._cancel_scopes[key]
            if self._newest_claim.get(job.id, _NO_RUN) == job.claim_id:
                del self._newest_claim[job.id]
            self._slots.release()
            if not self._slots.used and self._producer.waiting:
                # Idle now, and no fetch is coming to carry the outcome: write it,
                # so the next fetch has none and need not wait for the disk.
                self._completer.flush_soon()

    def _is_newest(self, job: ClaimedJob) -> bool:
        """Whether `job` is the newest run of its job here; if not, say its outcome is dropped.

        A claim lost to a crash of the server hands out its attempt number
        again, and this worker may claim the job again while the first run
        still goes. Both claims can then share one batch of outcomes, where
        the batch-wide claim fence cannot tell them apart: the older run's
        outcome is dropped here instead.
        """
        if self._newest_claim.get(job.id, _NO_RUN) == job.claim_id:
            return True
        logger.warning(
            "outcome of job %s attempt %s not written: this worker claimed the job again",
            job.id,
            job.attempt,
            extra={
                "event": "job.outcome_fenced",
                "job_id": job.id,
                "attempt": job.attempt,
                "worker_id": self.id,
            },
        )
        return False

    async def _drain(self, jobs: anyio.abc.TaskGroup) -> None:
        """After fetching stopped: give running jobs the grace period, then cancel them."""
        if self._slots.used:
            logger.info(
                "waiting up to %.0f s for %d running jobs",
                self.shutdown_timeout,
                self._slots.used,
                extra={
                    "event": "worker.draining",
                    "worker_id": self.id,
                    "running": self._slots.used,
                },
            )
            with anyio.move_on_after(self.shutdown_timeout):
                await self._slots.wait_empty()
        jobs.cancel_scope.cancel()

    async def _cleanup(self) -> None:
        """Flush what outcomes are left, unregister, close connections: bounded."""
        pending = self._completer.take_pending()
        # Try at once: a backoff left from an earlier failure would eat the bound.
        self._link.hurry()
        with anyio.move_on_after(CLEANUP_TIMEOUT) as bounded:
            try:
                if not self._registered:
                    return
                await self._completer.write_now(pending)
                if self._producer.lost_fetches:
                    # worker_delete below returns the jobs of those that committed;
                    # those still running on the server commit to no live worker.
                    logger.warning(
                        "fetches whose replies were lost may still run on the server: another "
                        "worker's maintenance will retry the jobs they commit",
                        extra={"event": "worker.lost_fetch_left", "worker_id": self.id},
                    )
                conn = await self._link.get()
                released = await _store.worker_delete(
                    conn,
                    self.queue.statements,
                    worker_id=self.id,
                    channel=self.queue.channel,
                    queues=self.queues,
                )
                if released:
                    logger.warning(
                        "returned %d unfinished jobs to the queue",
                        released,
                        extra={"event": "worker.released", "worker_id": self.id, "count": released},
                    )
            except psycopg.Error as ex:
                logger.warning(
                    "could not unregister the worker: %s",
                    type(ex).__name__,
                    extra={
                        "event": "worker.unregister_failed",
                        "worker_id": self.id,
                        "error": type(ex).__name__,
                    },
                )
            finally:
                await self._link.close()
        if bounded.cancelled_caught:
            logger.warning(
                "could not unregister the worker within %.0f s: its running jobs wait for a "
                "rescue once its heartbeat expires",
                CLEANUP_TIMEOUT,
                extra={
                    "event": "worker.unregister_failed",
                    "worker_id": self.id,
                    "error": "TimeoutError",
                },
            )
