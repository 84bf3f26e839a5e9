"""A small connection pool for anyio, on asyncio and trio.

`psycopg_pool` runs asyncio tasks of its own and does not work under trio; this
pool has no background task at all: a semaphore bounds the connections, idle
ones are reused last-in first-out, a connection past its lifetime or closed is
discarded at checkout or return, and the return is shielded and bounded. A
connection the server has ended (a restart, a failover) is not detected before
it is lent: its first statement fails, and it is discarded when it comes back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Self

import anyio
from psycopg import pq

from ._connection import EXIT_TIMEOUT, Connection
from .errors import ConfigurationError

__all__ = ["DEFAULT_MAX_LIFETIME", "DEFAULT_MAX_SIZE", "Pool"]

DEFAULT_MAX_SIZE: Final = 10
"""Connections a `Pool` opens at most."""

DEFAULT_MAX_LIFETIME: Final = 3600.0
"""Seconds after which a pooled connection is closed instead of reused."""

_IDLE: Final = pq.TransactionStatus.IDLE


class Pool:
    """Connections to one database, opened on demand, for anyio code.

    Connections are autocommit: a statement outside ``conn.transaction()``
    commits by itself, and inside it everything commits together.

    Args:
        conninfo: a libpq connection string.
        max_size: the most connections open at once; callers beyond it wait.
        max_lifetime: seconds after which a connection is retired.
        **kwargs: more libpq parameters for every connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        **kwargs: Any,
    ) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ConfigurationError(f"max_size must be an integer >= 1, got {max_size!r}")
        if not max_lifetime > 0:
            raise ConfigurationError(f"max_lifetime must be > 0 seconds, got {max_lifetime!r}")
        self.conninfo = conninfo
        self.max_size = max_size
        self.max_lifetime = max_lifetime
        self._kwargs = kwargs
        self._slots = anyio.Semaphore(max_size, fast_acquire=True)
        self._idle: list[tuple[float, Connection[Any]]] = []
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection[Any]]:
        """Borrow a connection; it goes back (rolled back if left mid-transaction) on exit."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        async with self._slots:
            born, conn = await self._checkout()
            try:
                yield conn
            finally:
                with anyio.CancelScope(shield=True):
                    await self._give_back(born, conn)

    async def _checkout(self) -> tuple[float, Connection[Any]]:
        while self._idle:
            born, conn = self._idle.pop()
            if not conn.closed and time.monotonic() - born < self.max_lifetime:
                return born, conn
            await conn.close()
        conn = await Connection[Any].connect(self.conninfo, autocommit=True, **self._kwargs)
        return time.monotonic(), conn

    async def _give_back(self, born: float, conn: Connection[Any]) -> None:
        if conn.closed:
            return
        if conn.info.transaction_status != _IDLE:
            try:
                with anyio.fail_after(EXIT_TIMEOUT):
                    await conn.rollback()
            except Exception:  # noqa: BLE001 (a connection that cannot roll back is dropped)
                await conn.close()
                return
        if self._closed or time.monotonic() - born >= self.max_lifetime:
            await conn.close()
        else:
            self._idle.append((born, conn))

    async def close(self) -> None:
        """Close idle connections now and borrowed ones when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _born, conn in idle:
            await conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
