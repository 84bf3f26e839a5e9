"""The listener: a dedicated connection that LISTENs and wakes the producer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from contextlib import aclosing
from typing import Any, Final

import anyio
import psycopg
from anyio.abc import TaskStatus

from .. import _store
from .._backoff import Backoff
from .._connection import Connection
from .._queue import CANCEL_PAYLOAD
from ..instrumentation import Instrumentation
from ._link import CONNECTION_KWARGS
from ._wakeup import Wakeup

__all__ = ["DEFAULT_PROBE_INTERVAL", "Listener"]

logger = logging.getLogger("pgoutbox.listener")

DEFAULT_PROBE_INTERVAL: Final = 30.0
"""Seconds between checks that the LISTEN connection still answers a query."""

PROBE_TIMEOUT: Final = 10.0
"""Seconds a probe may take before the listener connection is deemed dead."""


class Listener:
    """LISTENs on the schema's channel and sets `wakeup` for notifications of our queues
    (and `cancel_hint` for cancel requests).

    If LISTEN cannot be set up, or the connection dies, it logs one warning,
    leaves the producer to poll, and retries with backoff; after every
    successful LISTEN it sets `wakeup` so that the producer fetches whatever was
    notified while nobody listened. Every `probe_interval` seconds it runs a
    query on the connection, so a half-open socket is noticed.
    """

    def __init__(
        self,
        conninfo: Callable[[], str],
        channel: str,
        queues: Collection[str],
        wakeup: Wakeup,
        *,
        cancel_hint: Wakeup,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._queues = frozenset(queues)
        self._wakeup = wakeup
        self._cancel_hint = cancel_hint
        self._instrumentation = instrumentation
        self._probe_interval = probe_interval
        self._scope: anyio.CancelScope | None = None
        self._listening = False
        self._listening_changed = anyio.Event()
        self.pids: list[int] = []
        """Backend pid of every LISTEN connection opened, in order."""

    @property
    def listening(self) -> bool:
        """Whether a LISTEN is in place right now."""
        return self._listening

    def _set_listening(self, *, value: bool) -> None:
        self._listening = value
        if self._instrumentation is not None:
            self._instrumentation.listening_changed(value)
        self._listening_changed.set()
        self._listening_changed = anyio.Event()

    async def wait_listening(self) -> None:
        """Block until a LISTEN is in place."""
        while not self._listening:
            await self._listening_changed.wait()

    def reset(self) -> None:
        """Drop the current connection and listen again on a new one."""
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports started at once (polling covers the gap)."""
        task_status.started()
        backoff = Backoff()
        degraded = False
        while True:
            with anyio.CancelScope() as self._scope:
                try:
                    async with await Connection[Any].connect(
                        self._conninfo(), autocommit=True, **CONNECTION_KWARGS
                    ) as conn:
                        await _store.listen(conn, self._channel)
                        self.pids.append(conn.info.backend_pid)
                        self._set_listening(value=True)
                        backoff.reset()
                        if degraded:
                            degraded = False
                            logger.info("listening again", extra={"event": "listener.recovered"})
                        self._wakeup.set()
                        await self._consume(conn)
                except (psycopg.Error, OSError, TimeoutError) as ex:
                    if not degraded:
                        degraded = True
                        logger.warning(
                            "cannot listen for new jobs (%s); polling until LISTEN works again",
                            type(ex).__name__,
                            extra={"event": "listener.unavailable", "error": type(ex).__name__},
                        )
                finally:
                    if self._listening:
                        self._set_listening(value=False)
            self._scope = None
            await anyio.sleep(backoff.next_interval())

    async def _consume(self, conn: Connection[Any]) -> None:
        while True:
            async with aclosing(conn.notifies(timeout=self._probe_interval)) as notifies:
                async for notify in notifies:
                    if notify.payload in self._queues:
                        self._wakeup.set()
                    elif notify.payload == CANCEL_PAYLOAD:
                        self._cancel_hint.set()
            with anyio.fail_after(PROBE_TIMEOUT):
                await conn.execute("SELECT 1")
