"""The heartbeat: proves the worker alive, relays cancel requests, rescues dead workers' jobs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import anyio
import psycopg
from anyio.abc import TaskStatus

from .. import _store
from .._connection import Connection
from .._queue import Queue
from ._link import RECONNECT_ON, Link
from ._wakeup import Wakeup

__all__ = [
    "DEFAULT_COMPLETED_RETENTION",
    "DEFAULT_FAILED_RETENTION",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAINTENANCE_INTERVAL",
    "Heartbeat",
]

logger = logging.getLogger("pgoutbox.worker")

DEFAULT_HEARTBEAT_INTERVAL: Final = 1.0
"""Seconds between heartbeats; also how often running jobs are checked for cancel requests."""

DEFAULT_HEARTBEAT_TIMEOUT: Final = 30.0
"""Seconds without a heartbeat after which a worker is deemed dead and its jobs are rescued."""

DEFAULT_MAINTENANCE_INTERVAL: Final = 5.0
"""Seconds between attempts to run maintenance (only one worker at a time succeeds)."""

DEFAULT_COMPLETED_RETENTION: Final = 3600.0
"""Seconds completed and cancelled jobs are kept before they are pruned."""

DEFAULT_FAILED_RETENTION: Final = 7 * 24 * 3600.0
"""Seconds failed jobs (the dead-letter view) are kept before they are pruned."""

PRUNE_BATCH: Final = 10_000
"""Finished jobs deleted per statement; a maintenance round repeats while batches come back full."""

PRUNE_ROUND_LIMIT: Final = 10
"""Prune statements per maintenance round at most, so pruning never hogs the connection."""

STATEMENT_TIMEOUT: Final = 10.0
"""Seconds a heartbeat or maintenance statement may take before the connection is dropped."""


class Heartbeat:
    """Beats on its own task, so busy handlers cannot delay it.

    Each beat refreshes the worker's row and fetches which of its running jobs
    were asked to be cancelled (a NOTIFY sets `cancel_hint` to beat at once).
    If the row is gone, the worker was declared dead and its jobs rescued: it
    says so and registers again. Every `maintenance_interval` it tries the
    maintenance lock; whoever holds it removes workers whose heartbeat expired
    and retries the jobs they held, then deletes finished jobs past their retention,
    then sets `vacuum_due` if the jobs table holds `vacuum_threshold` dead rows and
    as many rows changed since it last did (0: never).
    """

    def __init__(
        self,
        link: Link,
        queue: Queue,
        worker_id: str,
        *,
        register: Callable[[Connection[Any]], Awaitable[None]],
        on_cancel: Callable[[Iterable[int]], None],
        cancel_hint: Wakeup,
        interval: float,
        maintenance_interval: float,
        completed_retention: float,
        failed_retention: float,
        vacuum_threshold: int = 0,
        vacuum_due: Wakeup | None = None,
    ) -> None:
        self._link = link
        self._queue = queue
        self._worker_id = worker_id
        self._register = register
        self._on_cancel = on_cancel
        self._cancel_hint = cancel_hint
        self._interval = interval
        self._maintenance_interval = maintenance_interval
        self._completed_retention = completed_retention
        self._failed_retention = failed_retention
        self._vacuum_threshold = vacuum_threshold
        self._vacuum_due = vacuum_due
        self._changes_at_vacuum: int | None = None
        self.rescued = 0
        """Jobs this worker rescued from dead workers since it started."""
        self.pruned = 0
        """Finished jobs this worker deleted past their retention since it started."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Beat until cancelled."""
        task_status.started()
        next_maintenance = anyio.current_time()
        while True:
            await self._cancel_hint.wait(self._interval)
            conn = await self._link.get()
            try:
                with anyio.fail_after(STATEMENT_TIMEOUT):
                    await self._beat(conn)
                    # With every slot busy on long jobs no fetch or write may come
                    # for a long time: the beat is what tells the link it works
                    # again, so that the next failure starts the backoff afresh.
                    self._link.succeeded()
                    if anyio.current_time() >= next_maintenance:
                        next_maintenance = anyio.current_time() + self._maintenance_interval
                        await self._maintain(conn)
            except RECONNECT_ON as ex:
                await self._link.failed(conn, ex)

    async def _beat(self, conn: Connection[Any]) -> None:
        st = self._queue.statements
        alive, to_cancel = await _store.worker_heartbeat(conn, st, worker_id=self._worker_id)
        if not alive:
            await self._register(conn)
            logger.warning(
                "this worker had been declared dead (heartbeat expired): its running jobs "
                "were rescued and their outcomes will not be written; registered again",
                extra={"event": "worker.declared_dead", "worker_id": self._worker_id},
            )
        if to_cancel:
            self._on_cancel(to_cancel)

    async def _check_vacuum(self, conn: Connection[Any]) -> None:
        """Wake the vacuumer if the jobs table holds `vacuum_threshold` dead rows, and
        at least as many rows changed since this worker last woke it: rows that a long
        transaction still sees stay dead through a vacuum, and vacuuming again at every
        round would not remove them."""
        if self._vacuum_due is None or self._vacuum_threshold <= 0:
            return
        try:
            due, changes = await _store.jobs_vacuum_due(
                conn,
                self._queue.statements,
                schema=self._queue.schema,
                threshold=self._vacuum_threshold,
            )
        except RECONNECT_ON:
            raise  # the connection failed: the heartbeat reconnects
        except psycopg.Error as ex:
            # For example, statistics functions revoked: never vacuum, say so once.
            self._vacuum_threshold = 0
            logger.warning(
                "cannot check whether the jobs table needs a vacuum (%s): not vacuuming it",
                ex.sqlstate or type(ex).__name__,
                extra={
                    "event": "jobs.vacuum_check_failed",
                    "worker_id": self._worker_id,
                    "error": type(ex).__name__,
                },
            )
            return
        if self._changes_at_vacuum is not None and changes < self._changes_at_vacuum:
            # The statistics were reset (pg_stat_reset, a crash of the server):
            # count from where they start again.
            self._changes_at_vacuum = None
        if due and (
            self._changes_at_vacuum is None
            or changes - self._changes_at_vacuum >= self._vacuum_threshold
        ):
            self._changes_at_vacuum = changes
            self._vacuum_due.set()

    async def _maintain(self, conn: Connection[Any]) -> None:
        # The worker's connection is shared by several tasks: never open a
        # transaction on it (another task's statement would join it).
        workers, jobs = await _store.worker_rescue_expired(
            conn, self._queue.statements, schema=self._queue.schema, channel=self._queue.channel
        )
        # Count and log the rescue at once: the rescued jobs may already be
        # running again, and the worker may be stopped during the steps below.
        if workers or jobs:
            self.rescued += jobs
            logger.warning(
                "rescued %d jobs of %d workers whose heartbeat expired",
                jobs,
                workers,
                extra={
                    "event": "worker.rescued",
                    "worker_id": self._worker_id,
                    "workers": workers,
                    "jobs": jobs,
                },
            )
        for _ in range(PRUNE_ROUND_LIMIT):
            deleted = await _store.job_prune(
                conn,
                self._queue.statements,
                schema=self._queue.schema,
                completed_retention=self._completed_retention,
                failed_retention=self._failed_retention,
                limit=PRUNE_BATCH,
            )
            self.pruned += deleted
            if deleted:
                logger.debug(
                    "pruned %d finished jobs",
                    deleted,
                    extra={"event": "jobs.pruned", "worker_id": self._worker_id, "count": deleted},
                )
            if deleted < PRUNE_BATCH:
                break
        await self._check_vacuum(conn)
