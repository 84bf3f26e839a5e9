"""The worker's one persistent connection for fetching and acknowledging jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import anyio
import psycopg

from .._backoff import Backoff
from .._connection import Connection

__all__ = ["CONNECTION_KWARGS", "RECONNECT_ON", "Link"]

logger = logging.getLogger("pgoutbox.worker")

CONNECTION_KWARGS: Final[dict[str, Any]] = {
    # Notice a dead peer in about a minute even when no query is running.
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "application_name": "pgoutbox-worker",
}

RECONNECT_ON: Final = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    # A read-only server: a standby after a failover, or a primary made
    # read-only. A new connection may reach the new primary.
    psycopg.errors.ReadOnlySqlTransaction,
    TimeoutError,
)
"""Errors after which the fetch/ack connection is given up and opened again after
a backoff: the connection broke, a statement took too long, or the server
cannot write."""


class Link:
    """Owns the fetch/ack connection: opens it on demand, and after a failure
    closes it, waits a jittered exponential backoff, and opens a new one.

    `conninfo` is read at each connect. `on_failure` runs after each failure
    (the worker uses it to make the listener reconnect too).
    """

    def __init__(
        self,
        conninfo: Callable[[], str],
        *,
        on_failure: Callable[[], None] = lambda: None,
        prepared_statements: bool = True,
    ) -> None:
        self._conninfo = conninfo
        # psycopg prepares a statement after 5 uses; None never prepares (for
        # poolers in transaction mode that cannot keep prepared statements).
        self._prepare_threshold = 5 if prepared_statements else None
        self._on_failure = on_failure
        self._conn: Connection[Any] | None = None
        self._lock = anyio.Lock()
        self._backoff = Backoff()
        self._wait_before_connect = 0.0
        self.pids: list[int] = []
        """Backend pid of every connection opened, in order (for diagnostics and tests)."""

    async def get(self) -> Connection[Any]:
        """The open connection, connecting (after the backoff, if it failed) when needed."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:
            while self._conn is None or self._conn.closed:
                await anyio.sleep(self._wait_before_connect)
                try:
                    self._conn = await Connection[Any].connect(
                        self._conninfo(),
                        autocommit=True,
                        prepare_threshold=self._prepare_threshold,
                        **CONNECTION_KWARGS,
                    )
                except psycopg.OperationalError as ex:
                    self._note_failure(ex)
                else:
                    self._wait_before_connect = 0.0
                    self.pids.append(self._conn.info.backend_pid)
            return self._conn

    def hurry(self) -> None:
        """Make the next connection attempt at once, whatever the backoff (for the
        worker's last, bounded step); a failure then waits again."""
        self._wait_before_connect = 0.0

    def succeeded(self) -> None:
        """A statement succeeded: the next failure starts the backoff afresh."""
        self._backoff.reset()

    async def failed(self, conn: Connection[Any], error: BaseException) -> None:
        """`conn` failed with `error`: close it, so the next `get` reconnects."""
        if conn is self._conn:
            self._conn = None
            self._note_failure(error)
            self._on_failure()
        await conn.close()

    def _note_failure(self, error: BaseException) -> None:
        if not self._backoff.failures:
            logger.warning(
                "database connection failed, reconnecting with backoff: %s",
                type(error).__name__,
                extra={"event": "worker.connection_failed", "error": type(error).__name__},
            )
        self._wait_before_connect = self._backoff.next_interval()

    async def close(self) -> None:
        """Close the connection for good."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
