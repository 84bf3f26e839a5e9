"""Cancellation-safe psycopg connections under anyio, on asyncio and on trio.

Stock `psycopg.AsyncConnection` waits through asyncio-only functions and
expects asyncio's one-shot cancellation. Under anyio's level-triggered cancel
scopes a cancelled query closes the connection and keeps running on the server,
and under trio nothing works at all. psycopg is built around one seam, the
``wait(gen)`` method that drives its libpq generators; `Connection` replaces it
with an anyio wait on the socket, and adds what anyio needs on top:

- a 1-slot `anyio.Semaphore` as the connection lock (not `anyio.Lock`: psycopg
  may release it from another task when a ``notifies()`` loop is left);
- on cancellation with a query in flight: a shielded, bounded server-side cancel
  and drain of the same generator, so the connection stays usable;
- transaction and connection exits shielded and bounded;
- ``close()`` wakes a task blocked on the socket (e.g. in ``notifies()``).

This module is the only one that touches psycopg internals; `check_psycopg`
verifies them at import time.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Self, cast

import anyio
import psycopg
from psycopg import errors as e
from psycopg import pq
from psycopg.abc import PQGen, PQGenConn
from psycopg.conninfo import conninfo_attempts, make_conninfo, timeout_from_conninfo
from psycopg.rows import AsyncRowFactory, Row
from psycopg.transaction import AsyncTransaction

from .errors import IncompatiblePsycopgError

__all__ = ["Connection", "check_psycopg", "connect"]

logger = logging.getLogger("pgoutbox.connection")

CANCEL_TIMEOUT: Final = 5.0
"""Seconds allowed to cancel an interrupted query server-side before closing."""

EXIT_TIMEOUT: Final = 10.0
"""Seconds allowed for a shielded commit, rollback or close."""

_MAX_BUSY_INTERVAL: Final = 0.005
"""A generator that never blocks still yields to other tasks this often."""

_READ: Final = 1  # selectors.EVENT_READ == psycopg Wait.R == Ready.R
_WRITE: Final = 2  # selectors.EVENT_WRITE == psycopg Wait.W == Ready.W
_ACTIVE: Final = pq.TransactionStatus.ACTIVE


def check_psycopg() -> None:
    """Fail with a clear error if psycopg lacks an internal this module relies on."""
    needed = {
        "AsyncConnection.wait": getattr(psycopg.AsyncConnection, "wait", None),
        "AsyncConnection._connect_gen": getattr(psycopg.AsyncConnection, "_connect_gen", None),
        "AsyncConnection._cancel_gen": getattr(psycopg.AsyncConnection, "_cancel_gen", None),
        "AsyncConnection._get_connection_params": getattr(
            psycopg.AsyncConnection, "_get_connection_params", None
        ),
        "errors._WaitTimeout": getattr(e, "_WaitTimeout", None),
    }
    missing = sorted(name for name, value in needed.items() if value is None)
    if missing:
        raise IncompatiblePsycopgError(
            f"psycopg {psycopg.__version__} lacks {', '.join(missing)}, which pgoutbox's "
            "connection layer drives directly; install psycopg>=3.3.6,<3.4"
        )


check_psycopg()


class _BusyClock:
    """When this thread last let other tasks run while driving a generator."""

    last_checkpoint = 0.0


_TUPLE_ROW: Final = cast(AsyncRowFactory[Any], psycopg.rows.tuple_row)


def _ready_now(fileno: int, wanted: int) -> int:
    """The part of `wanted` (read/write bits) the socket is ready for, without blocking."""
    poller = select.poll()
    poller.register(
        fileno,
        (select.POLLIN if wanted & _READ else 0) | (select.POLLOUT if wanted & _WRITE else 0),
    )
    ready = 0
    for _fd, events in poller.poll(0):
        if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return wanted  # let libpq find the error
        if events & select.POLLIN:
            ready |= _READ
        if events & select.POLLOUT:
            ready |= _WRITE
    return ready


async def _wait_fd(fileno: int, wanted: int) -> int:
    """Block until the socket is ready for part of `wanted`; return what it is ready for."""
    try:
        if wanted == _READ:
            await anyio.wait_readable(fileno)
            return _READ
        if wanted == _WRITE:
            await anyio.wait_writable(fileno)
            return _WRITE
        # Both: rare (a pipeline flush with a full send buffer). Race the two.
        async with anyio.create_task_group() as tg:

            async def wait_then_stop(wait: Any) -> None:
                await wait(fileno)
                tg.cancel_scope.cancel()

            tg.start_soon(wait_then_stop, anyio.wait_readable)
            tg.start_soon(wait_then_stop, anyio.wait_writable)
        return _ready_now(fileno, wanted) or wanted
    except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError) as ex:
        raise e.OperationalError("connection socket closed") from ex


async def _checkpoint_if_busy() -> None:
    """Yield to other tasks if we have not done so for a while (starvation guard)."""
    now = time.monotonic()
    if now - _BusyClock.last_checkpoint >= _MAX_BUSY_INTERVAL:
        _BusyClock.last_checkpoint = now
        await anyio.lowlevel.checkpoint()


async def _drive(gen: PQGen[Any], fileno: int, timeout: float | None) -> Any:  # noqa: ASYNC109
    """Run a psycopg generator to completion, waiting on `fileno` with anyio.

    `timeout` is psycopg's wait protocol (raise `_WaitTimeout`), not a cancel scope.
    """
    try:
        wanted = next(gen)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = _ready_now(fileno, wanted) if wanted & _WRITE else 0
            if ready:
                await _checkpoint_if_busy()
            elif deadline is None:
                ready = await _wait_fd(fileno, wanted)
                _BusyClock.last_checkpoint = time.monotonic()
            else:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    ready = await _wait_fd(fileno, wanted)
                if not ready:
                    raise e._WaitTimeout("wait timeout expired")
            wanted = gen.send(ready)
    except StopIteration as stop:
        return stop.value


async def _drive_conn(gen: PQGenConn[Any], timeout: float | None) -> Any:  # noqa: ASYNC109
    """Like `_drive`, for connection generators whose socket may change."""
    try:
        fileno, wanted = next(gen)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = 0
            with anyio.move_on_after(None if deadline is None else deadline - time.monotonic()):
                ready = await _wait_fd(fileno, wanted)
            if not ready:
                raise e._WaitTimeout("wait timeout expired")
            fileno, wanted = gen.send(ready)
    except StopIteration as stop:
        return stop.value


class _ConnectionLock:
    """psycopg's connection lock, as a 1-slot semaphore that any task may release."""

    __slots__ = ("_semaphore",)

    def __init__(self) -> None:
        self._semaphore = anyio.Semaphore(1, fast_acquire=True)

    async def __aenter__(self) -> None:
        await self._semaphore.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._semaphore.release()

    def locked(self) -> bool:
        return self._semaphore.value == 0


class Connection(psycopg.AsyncConnection[Row]):
    """A `psycopg.AsyncConnection` that is safe under anyio, on asyncio and on trio.

    Use it like any psycopg async connection. The differences:

    - it works under trio as well as asyncio;
    - cancelling a task in the middle of a query cancels the query on the
      server and leaves the connection usable (at worst, after
      `CANCEL_TIMEOUT` seconds, closed);
    - ``transaction()`` and ``async with conn`` exits are shielded from
      cancellation and bounded by `EXIT_TIMEOUT` seconds;
    - ``close()`` wakes any task blocked on the connection, e.g. in ``notifies()``.

    Create one with `connect` (or ``Connection.connect``).
    """

    def __init__(
        self,
        pgconn: pq.abc.PGconn,
        row_factory: AsyncRowFactory[Row] = _TUPLE_ROW,
    ) -> None:
        super().__init__(pgconn, row_factory)
        self.lock = cast(Any, _ConnectionLock())

    @classmethod
    async def connect(
        cls,
        conninfo: str = "",
        *,
        autocommit: bool = False,
        prepare_threshold: int | None = 5,
        context: psycopg.abc.AdaptContext | None = None,
        row_factory: AsyncRowFactory[Row] | None = None,
        cursor_factory: type[psycopg.AsyncCursor[Row]] | None = None,
        **kwargs: psycopg.abc.ConnParam,
    ) -> Self:
        """Connect to the database; the anyio counterpart of psycopg's ``connect``."""
        params = await cls._get_connection_params(conninfo, **kwargs)
        timeout = float(timeout_from_conninfo(params))
        # Host name resolution blocks: do it in a thread.
        attempts = await anyio.to_thread.run_sync(conninfo_attempts, params)
        failures: list[e.Error] = []
        conn: Self | None = None
        for attempt in attempts:
            try:
                gen = cls._connect_gen(make_conninfo("", **attempt))
                conn = cast(Self, await _drive_conn(gen, timeout))
                break
            except e._WaitTimeout:
                failures.append(e.ConnectionTimeout("connection timeout expired"))
            except e.Error as ex:
                failures.append(ex)
        if conn is None:
            last = failures[-1] if failures else e.OperationalError("no host to connect to")
            if len(failures) > 1:
                detail = "; ".join(str(f).strip() for f in failures)
                raise type(last)(f"all connection attempts failed: {detail}") from None
            raise last.with_traceback(None)
        conn._autocommit = bool(autocommit)
        if row_factory is not None:
            conn.row_factory = row_factory
        if cursor_factory is not None:
            conn.cursor_factory = cursor_factory
        if context is not None:
            conn._adapters = psycopg.adapt.AdaptersMap(context.adapters)
        conn.prepare_threshold = prepare_threshold
        return conn

    async def wait(
        self,
        gen: PQGen[Any],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> Any:
        """Drive a psycopg generator with anyio; cancel the query server-side if interrupted."""
        try:
            return await _drive(gen, self.pgconn.socket, timeout)
        except BaseException as ex:
            if isinstance(ex, Exception) or self.pgconn.transaction_status != _ACTIVE:
                raise
            with anyio.CancelScope(shield=True):
                await self._abort_query(gen)
            raise

    async def _abort_query(self, gen: PQGen[Any]) -> None:
        """Cancel the in-flight query on the server and drain its results, or close."""
        with anyio.move_on_after(CANCEL_TIMEOUT) as scope:
            try:
                await self._send_cancel()
                await _drive(gen, self.pgconn.socket, None)
            except e.QueryCanceled:
                return
            except Exception as ex:  # noqa: BLE001 (any failure here means: close)
                logger.warning(
                    "query cancellation failed, closing the connection",
                    extra={"event": "connection.cancel_failed", "error": type(ex).__name__},
                )
                self._finish()
                return
            else:
                return
        if scope.cancelled_caught:
            logger.warning(
                "query not ended %.0f s after cancellation, closing the connection",
                CANCEL_TIMEOUT,
                extra={"event": "connection.cancel_timeout"},
            )
            self._finish()

    async def _send_cancel(self) -> None:
        if not self._should_cancel():
            return
        from psycopg._capabilities import capabilities  # noqa: PLC0415 (internal, guarded)

        if capabilities.has_cancel_safe():
            await _drive_conn(self._cancel_gen(), CANCEL_TIMEOUT)
        else:
            await anyio.to_thread.run_sync(self.cancel)

    def _finish(self) -> None:
        """Close the socket at once, waking any task blocked on it."""
        if self.pgconn.status == pq.ConnStatus.BAD:
            return
        with contextlib.suppress(OSError, e.OperationalError):
            anyio.notify_closing(self.pgconn.socket)
        self.pgconn.finish()

    async def close(self) -> None:
        """Close the connection; a task blocked on it wakes with an error."""
        if self.closed:
            return
        self._closed = True
        self._finish()

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        """A transaction block whose commit or rollback cannot be torn by cancellation."""
        if self._pipeline is not None:
            async with super().transaction(savepoint_name, force_rollback) as tx:
                yield tx
            return
        tx = AsyncTransaction(self, savepoint_name, force_rollback)
        await tx.__aenter__()
        try:
            yield tx
        except BaseException as ex:
            if not await self._shielded_exit(tx.__aexit__(type(ex), ex, ex.__traceback__)):
                raise
        else:
            await self._shielded_exit(tx.__aexit__(None, None, None))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self._shielded_exit(super().__aexit__(exc_type, exc_val, exc_tb))

    async def _shielded_exit(self, exit_coro: Any) -> Any:
        """Await a commit/rollback/close shielded from cancellation, bounded in time."""
        try:
            with anyio.fail_after(EXIT_TIMEOUT, shield=True):
                return await exit_coro
        except TimeoutError:
            self._finish()
            raise e.OperationalError(
                f"transaction end did not complete within {EXIT_TIMEOUT:.0f} s; "
                "the connection was closed and the outcome is unknown"
            ) from None


async def connect(
    conninfo: str = "", *, autocommit: bool = False, **kwargs: Any
) -> Connection[Any]:
    """Open a `Connection` (tuple rows); keyword arguments are libpq parameters."""
    return await Connection[Any].connect(conninfo, autocommit=autocommit, **kwargs)
