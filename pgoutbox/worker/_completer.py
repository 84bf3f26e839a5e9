"""The completer: writes job outcomes in batches on the fetch/ack connection."""

from __future__ import annotations

import logging
import time
from typing import Final

import anyio
import psycopg
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from .. import _store
from .._job import Outcome
from .._sql import Statements
from ..instrumentation import Instrumentation
from ._link import Link

__all__ = ["MAX_BATCH", "Completer"]

logger = logging.getLogger("pgoutbox.worker")

MAX_BATCH: Final = 1000
"""Outcomes written in one statement at most."""

WRITE_TIMEOUT: Final = 30.0
"""Seconds a batch write may take before the connection is deemed dead (then retried)."""


class Completer:
    """Collects outcomes from executors and writes each batch in one fenced statement.

    A batch is whatever has queued up while the previous one was being
    written, so under load it grows and at rest a single outcome goes out at
    once. The stream's buffer gives backpressure: executors wait when it is
    full. A failed write is retried on a new connection (writes are fenced by
    attempt, so a retry after an unknown commit is harmless).
    """

    def __init__(
        self,
        link: Link,
        statements: Statements,
        *,
        buffer: int,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self._link = link
        self._instrumentation = instrumentation
        self._statements = statements
        self._send, self._receive = anyio.create_memory_object_stream[Outcome](buffer)

    @property
    def sender(self) -> MemoryObjectSendStream[Outcome]:
        """Where executors send outcomes; closing it (all clones) ends `run`."""
        return self._send

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write outcomes until the send side is closed and everything is written."""
        task_status.started()
        async for first in self._receive:
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            await self._write(batch)

    def take_pending(self) -> list[Outcome]:
        """Take every outcome not yet written and close the stream (after `run` ended)."""
        left: list[Outcome] = []
        self._send.close()
        with self._receive:
            while True:
                try:
                    left.append(self._receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    return left

    async def _write(self, batch: list[Outcome]) -> None:
        while True:
            conn = await self._link.get()
            started = time.monotonic()
            try:
                with anyio.fail_after(WRITE_TIMEOUT):
                    written = await _store.job_set_outcome_many(conn, self._statements, batch)
            except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as ex:
                await self._link.failed(conn, ex)
                continue
            self._link.succeeded()
            if self._instrumentation is not None:
                self._instrumentation.outcomes_written(len(batch), time.monotonic() - started)
            break
        if len(written) < len(batch):
            for outcome in batch:
                if outcome.id not in written:
                    logger.warning(
                        "outcome of job %s attempt %s not written: the job is no longer "
                        "running under that attempt",
                        outcome.id,
                        outcome.attempt,
                        extra={
                            "event": "job.outcome_fenced",
                            "job_id": outcome.id,
                            "attempt": outcome.attempt,
                            "state": outcome.state.value,
                        },
                    )

    async def write_now(self, batch: list[Outcome]) -> None:
        """Write `batch` directly (used for the bounded final flush)."""
        if batch:
            await self._write(batch)
