"""The completer: writes job outcomes in batches on the fetch/ack connection."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import Final

import anyio
from anyio.abc import TaskStatus

from .. import _store
from .._job import JobState, Outcome
from .._sql import Statements
from ..instrumentation import Instrumentation
from ._link import RECONNECT_ON, Link
from ._wakeup import Wakeup

__all__ = ["LINGER", "MAX_BATCH", "Completer"]

logger = logging.getLogger("pgoutbox.worker")

MAX_BATCH: Final = 1000
"""Outcomes written in one statement at most."""

LINGER: Final = 0.02
"""Seconds completions may wait for the producer's next fetch to carry them."""

_RUN_AGAIN: Final = frozenset({JobState.AVAILABLE, JobState.RETRYABLE, JobState.SCHEDULED})
"""Outcomes that leave the job to run again."""


WRITE_TIMEOUT: Final = 30.0
"""Seconds a batch write may take before the connection is deemed dead (then retried)."""


class Completer:
    """Collects outcomes from executors and writes them in batches, fenced by attempt.

    Completions usually leave with the producer's next fetch: one statement
    and one commit for both (`take_completions`). They wait for it up to
    `LINGER` seconds, or until as many wait as the worker has slots, or until
    the worker falls idle (`flush_soon`); then the completer writes them itself.
    Everything else (failures, retries, cancellations) is written at once,
    together with whatever waits. A batch is whatever queued up meanwhile, so
    under load it grows, and at rest one outcome goes out alone.

    At most `capacity` outcomes wait: executors then wait in `put`
    (backpressure). A failed write is retried on a new connection: writes are
    fenced by attempt, so a retry after an unknown commit is harmless.

    A written batch that leaves jobs to run again (a retry, a snooze, an
    interrupted attempt) sets `rerun`: the producer then fetches, and learns
    when they are due, even if no fetch was coming before its next poll.
    """

    def __init__(
        self,
        link: Link,
        statements: Statements,
        *,
        capacity: int,
        keep_completed: bool = True,
        instrumentation: Instrumentation | None = None,
        rerun: Wakeup | None = None,
    ) -> None:
        self._link = link
        self._rerun = rerun
        self._statements = statements
        self._capacity = capacity
        self._flush_at = min(capacity, MAX_BATCH)
        self._keep_completed = keep_completed
        self._instrumentation = instrumentation
        self._pending: list[Outcome] = []
        # The batch `run` is writing: if the write is cancelled (the worker
        # stopping at once), `take_pending` hands it out again with the rest.
        self._inflight: list[Outcome] = []
        self._others = 0  # pending outcomes that are not completions: written at once
        self._oldest = 0.0  # when the pending list last became non-empty
        self._hurry = False  # write what waits without lingering
        self._closed = False
        # The writer's wake-up: set only when it must act (not on every outcome).
        self._attention = anyio.Event()
        self._space = anyio.Event()
        self._space_waiters = 0

    @property
    def pending(self) -> int:
        """Outcomes waiting to be written."""
        return len(self._pending)

    def put_nowait(self, outcome: Outcome) -> bool:
        """Queue `outcome` unless `capacity` outcomes already wait; False if full."""
        if len(self._pending) >= self._capacity:
            return False
        self._add(outcome)
        return True

    def put_anyway(self, outcome: Outcome) -> None:
        """Queue `outcome` even beyond `capacity` (for interrupted attempts at shutdown)."""
        self._add(outcome)

    async def put(self, outcome: Outcome) -> None:
        """Queue `outcome`, waiting while `capacity` outcomes wait (backpressure)."""
        while len(self._pending) >= self._capacity:
            self._space_waiters += 1
            try:
                await self._space.wait()
            finally:
                self._space_waiters -= 1
        self._add(outcome)

    def _add(self, outcome: Outcome) -> None:
        if not self._pending:
            self._oldest = time.monotonic()
            self._attention.set()
        self._pending.append(outcome)
        if outcome.state is not JobState.COMPLETED:
            self._others += 1
            self._attention.set()
        elif len(self._pending) >= self._flush_at:
            self._attention.set()

    def _removed(self) -> None:
        """After taking outcomes out: restart the linger clock for what is left, wake putters."""
        self._oldest = time.monotonic() if self._pending else 0.0
        self._hurry = self._hurry and bool(self._pending)
        if self._space_waiters:
            self._space.set()
            self._space = anyio.Event()

    def flush_soon(self) -> None:
        """Write the waiting outcomes without lingering: no fetch is coming to carry them.

        The worker calls this when its last job ends while the producer waits
        for work. The next fetch then completes nothing, so it commits without
        waiting for the disk, which shortens an idle worker's start latency.
        """
        if self._pending:
            self._hurry = True
            self._attention.set()

    def take_completions(self) -> list[Outcome]:
        """Take the waiting completions (at most `MAX_BATCH`), to write with a fetch."""
        if self._others:
            taken = [o for o in self._pending if o.state is JobState.COMPLETED][:MAX_BATCH]
            kept = set(map(id, taken))
            self._pending = [o for o in self._pending if id(o) not in kept]
        else:
            taken = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
        if taken:
            self._removed()
        return taken

    def give_back(self, outcomes: Sequence[Outcome]) -> None:
        """Return outcomes taken by `take_completions` whose write failed: written next."""
        if outcomes:
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending[:0] = outcomes
            self._attention.set()

    def written(
        self, batch: Sequence[Outcome], written: Collection[tuple[int, int]], duration: float
    ) -> None:
        """Account for a written `batch` (`written`: the (id, attempt) the fence let through)."""
        if self._instrumentation is not None:
            self._instrumentation.outcomes_written(len(batch), duration)
        if len(written) < len(batch):
            for outcome in batch:
                if (outcome.id, outcome.attempt) not in written:
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

    def close(self) -> None:
        """No more outcomes will come: `run` writes what waits and returns."""
        self._closed = True
        self._attention.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write outcomes until `close` is called and everything is written."""
        task_status.started()
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._wait()
                continue
            if self._should_linger():
                with anyio.move_on_after(self._oldest + LINGER - time.monotonic()):
                    await self._wait()
                continue
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            self._others -= sum(1 for o in batch if o.state is not JobState.COMPLETED)
            self._removed()
            self._inflight = batch
            await self._write(batch)
            self._inflight = []

    def _should_linger(self) -> bool:
        """Whether waiting completions should wait for the producer's fetch a little longer."""
        return (
            not self._closed
            and not self._hurry
            and not self._others
            and len(self._pending) < self._flush_at
            and time.monotonic() < self._oldest + LINGER
        )

    async def _wait(self) -> None:
        self._attention = anyio.Event()
        await self._attention.wait()

    def take_pending(self) -> list[Outcome]:
        """Take every outcome not known to be written (after `run` ended) and close:
        also the batch whose write was cancelled, which may or may not have
        committed (writes are fenced, so writing it again is harmless)."""
        self._closed = True
        left, self._pending = self._inflight + self._pending, []
        self._inflight = []
        self._others = 0
        self._removed()
        return left

    async def _write(self, batch: list[Outcome]) -> None:
        while True:
            conn = await self._link.get()
            started = time.monotonic()
            try:
                with anyio.fail_after(WRITE_TIMEOUT):
                    written = await _store.job_set_outcome_many(
                        conn,
                        self._statements,
                        batch,
                        keep_completed=self._keep_completed,
                    )
            except RECONNECT_ON as ex:
                await self._link.failed(conn, ex)
                continue
            self._link.succeeded()
            break
        self.written(batch, written, time.monotonic() - started)
        if self._rerun is not None and any(o.state in _RUN_AGAIN for o in batch):
            self._rerun.set()

    async def write_now(self, batch: list[Outcome]) -> None:
        """Write `batch` directly (used for the bounded final flush)."""
        if batch:
            await self._write(batch)
