"""The vacuumer: vacuums the jobs table when the heartbeat finds it due."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import anyio
import psycopg
from anyio.abc import TaskStatus

from .. import _store
from .._connection import Connection
from .._queue import Queue
from ._link import CONNECTION_KWARGS
from ._wakeup import Wakeup

__all__ = ["DEFAULT_VACUUM_THRESHOLD", "Vacuumer"]

logger = logging.getLogger("pgoutbox.worker")

DEFAULT_VACUUM_THRESHOLD: Final = 100_000
"""Dead row versions in the jobs table that make a maintenance round vacuum it."""

TRANSACTION_TIMEOUT_SINCE: Final = 170000
"""The first server version (``server_version_num``) with ``transaction_timeout``."""

SKIPPED: Final = {
    "55P03": "another vacuum of it is running",
    "42501": "this role may not vacuum it",
}
"""The SQLSTATEs of the warnings with which VACUUM skips a table, and what they mean."""


class Vacuumer:
    """Runs ``VACUUM`` on the jobs table each time `due` is set.

    Every claimed job leaves a dead entry at the head of the index that
    fetches scan, and every fetch reads the pages they fill until a vacuum
    removes them; autovacuum comes at most once per ``autovacuum_naptime``.

    A vacuum of a large table takes long, so it runs on a connection of its
    own, opened for it and closed after it: not on the fetch/ack connection,
    where fetches would wait, nor in the heartbeat's task, whose beats would
    stop. A failure is logged and waits for the next round that finds the
    table due.
    """

    def __init__(
        self, conninfo: Callable[[], str], queue: Queue, worker_id: str, due: Wakeup
    ) -> None:
        self._conninfo = conninfo
        self._queue = queue
        self._worker_id = worker_id
        self._due = due
        self.vacuums = 0
        """Vacuums of the jobs table this worker ran since it started."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Vacuum whenever due, until cancelled."""
        task_status.started()
        while True:
            await self._due.wait()
            started = anyio.current_time()
            try:
                warned = await self._vacuum()
            except psycopg.Error as ex:
                logger.warning(
                    "could not vacuum the jobs table: %s",
                    ex.sqlstate or type(ex).__name__,
                    extra={
                        "event": "jobs.vacuum_failed",
                        "worker_id": self._worker_id,
                        "error": type(ex).__name__,
                        "sqlstate": ex.sqlstate,
                    },
                )
                continue
            # PostgreSQL only warns when it skips the table: its lock is taken
            # (another vacuum runs), or the role may not vacuum it after all.
            skipped = next((code for code in warned if code in SKIPPED), None)
            if skipped is not None:
                logger.info(
                    "did not vacuum the jobs table: %s",
                    SKIPPED[skipped],
                    extra={
                        "event": "jobs.vacuum_skipped",
                        "worker_id": self._worker_id,
                        "sqlstate": skipped,
                    },
                )
                continue
            self.vacuums += 1
            seconds = anyio.current_time() - started
            logger.info(
                "vacuumed the jobs table in %.2f s",
                seconds,
                extra={"event": "jobs.vacuumed", "worker_id": self._worker_id, "seconds": seconds},
            )

    async def _vacuum(self) -> list[str]:
        """Vacuum the table on a new connection; return the SQLSTATEs of its warnings."""
        warned: list[str] = []
        async with await Connection[Any].connect(
            self._conninfo(), autocommit=True, **CONNECTION_KWARGS
        ) as conn:
            conn.add_notice_handler(lambda diag: warned.append(diag.sqlstate or ""))
            # The timeouts a role or a database may set are meant for the
            # application's queries; a vacuum of a large table may take
            # minutes, and autovacuum is not subject to them either. The
            # session is this vacuum's alone, closed after it (workers do not
            # run through transaction pooling, where a SET would outlive it).
            await conn.execute("SET statement_timeout = 0")
            if conn.info.server_version >= TRANSACTION_TIMEOUT_SINCE:
                await conn.execute("SET transaction_timeout = 0")
            await _store.jobs_vacuum(conn, schema=self._queue.schema)
        return warned
