"""The producer: claims jobs into free execution slots."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio

from .. import _store
from .._connection import Connection
from .._job import ClaimedJob
from .._queue import Queue
from ._completer import Completer
from ._link import RECONNECT_ON, Link
from ._wakeup import Wakeup

__all__ = ["FETCH_DEBOUNCE", "FETCH_TIMEOUT", "Feed", "Producer", "Slots"]

logger = logging.getLogger("pgoutbox.worker")

FETCH_TIMEOUT: Final = 30.0
"""Seconds a fetch may take before the connection is deemed dead."""

PENDING_CHECK_INTERVAL: Final = 0.5
"""Seconds between looks at whether fetches whose replies were lost have ended."""

FETCH_DEBOUNCE: Final = 0.005
"""Seconds a busy worker with a backlog waits for more free slots, so one fetch fills several."""


class Slots:
    """Counts running jobs against the concurrency limit and wakes a waiter when
    enough slots are free for it (not on every release)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._changed = anyio.Event()
        self._wanted = 0  # free slots the current waiter needs; 0: nobody waits
        self.waking = False
        """Whether a release woke the waiter and it has not run yet."""

    @property
    def free(self) -> int:
        return self.size - self.used

    def take(self) -> None:
        self.used += 1

    def release(self) -> None:
        """Free a slot, waking the waiter if enough are free for it."""
        self.used -= 1
        if self._wanted and self.size - self.used >= self._wanted:
            self._wanted = 0
            self.waking = True
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_free(self, minimum: int = 1) -> None:
        """Wait until at least `minimum` slots are free (one waiter at a time)."""
        minimum = min(minimum, self.size)
        while self.free < minimum:
            self._wanted = minimum
            try:
                await self._changed.wait()
            finally:
                self._wanted = 0
                self.waking = False

    async def wait_empty(self) -> None:
        await self.wait_free(self.size)


class Feed:
    """Hands claimed jobs to idle executors, waking one at a time.

    An executor that takes a job wakes the next idle one only if more jobs
    wait and no other is already waking: jobs that never wait on anything run
    back to back in one executor, and a job that does wait lets the next
    executor start the next job.
    """

    def __init__(self) -> None:
        self._jobs: deque[ClaimedJob] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._waking = 0

    def put(self, job: ClaimedJob) -> None:
        self._jobs.append(job)
        if not self._waking:
            self._wake_one()

    def _wake_one(self) -> None:
        if self._idle:
            self._waking += 1
            self._idle.popleft().set()

    async def get(self) -> ClaimedJob:
        """The next job, waiting for one if none is queued."""
        while not self._jobs:
            woken = anyio.Event()
            self._idle.append(woken)
            try:
                await woken.wait()
            finally:
                if woken.is_set():
                    self._waking -= 1
                else:  # cancelled while idle
                    self._idle.remove(woken)
        job = self._jobs.popleft()
        if self._jobs and not self._waking:
            self._wake_one()
        return job


@dataclass
class _Unconfirmed:
    """A fetch whose reply was lost."""

    claim_id: str
    session_key: int
    """The key of the session lock its connection held."""
    reported: bool = False
    """Whether the worker said that it may still run."""


class Producer:
    """Claims due jobs of the worker's queues and tasks into its free slots.

    It fetches at once while fetches come back full; otherwise it sleeps until
    a wake-up (NOTIFY), the next known delayed job, or `poll_interval`. Each
    fetch is one statement claiming at most the free slots, shielded from
    cancellation and bounded by `FETCH_TIMEOUT`; claimed jobs are handed over
    before anything else may fail. The same statement completes the attempts
    waiting in the completer, so under a backlog a job costs one round trip
    and one commit, shared with the rest of its batch. On a connection error
    it drops the connection (the link backs off before reconnecting) and
    tries again.

    Before a connection's first fetch it takes a session lock (see
    `_release_unconfirmed`), and asks the server to end the session once it
    has been idle for `session_idle_timeout` seconds, or its client is gone.
    """

    def __init__(
        self,
        link: Link,
        queue: Queue,
        *,
        worker_id: str,
        queues: Sequence[str],
        tasks: Sequence[str],
        slots: Slots,
        wakeup: Wakeup,
        poll_interval: float,
        completer: Completer,
        keep_completed: bool = True,
        session_idle_timeout: float = 60.0,
    ) -> None:
        self._link = link
        self._queue = queue
        self._worker_id = worker_id
        self._queues = list(queues)
        self._tasks = list(tasks)
        self._slots = slots
        self._wakeup = wakeup
        self._poll_interval = poll_interval
        self._completer = completer
        self._keep_completed = keep_completed
        # Fetches whose reply was lost: the claim id, and the key of the session
        # lock that the connection they ran on held (the fetch may still run).
        self._unconfirmed: list[_Unconfirmed] = []
        self._session_lock: tuple[Connection[Any], int] | None = None
        self._next_pending_check = 0.0
        self._idle_timeout = session_idle_timeout
        self.waiting = False
        """Whether it sleeps until new work may be there (its last fetch was not full)."""
        self.fetches = 0
        """Fetch statements run."""
        self.claimed = 0
        """Jobs claimed."""

    async def run(self, start_job: Callable[[ClaimedJob], None]) -> None:
        """Claim jobs and pass each to `start_job` (which must not block) until cancelled."""
        more = True
        next_due: float | None = None
        batch = max(1, self._slots.size // 2)
        while True:
            await self._slots.wait_free()
            if more and self._slots.free < batch:
                # A backlog and busy slots: fetching for each freed slot would cost a
                # round trip per job; wait briefly so one fetch fills several.
                with anyio.move_on_after(FETCH_DEBOUNCE):
                    await self._slots.wait_free(batch)
            if not more:
                wait = (
                    self._poll_interval if next_due is None else min(self._poll_interval, next_due)
                )
                if self._unconfirmed:  # look again soon whether they can be given back
                    wait = min(wait, PENDING_CHECK_INTERVAL)
                if not self._slots.used:
                    # Idle, and no fetch is coming to carry waiting completions.
                    self._completer.flush_soon()
                self.waiting = True
                try:
                    await self._wakeup.wait(wait)
                finally:
                    self.waiting = False
            limit = self._slots.free
            fetched = await self._claim(limit)
            if fetched is None:
                more = True  # the fetch failed: try again (after the link's backoff)
                continue
            claimed, next_due = fetched
            # Claimed jobs are handed over before anything else can fail.
            for job in claimed:
                self._slots.take()
                start_job(job)
            more = len(claimed) == limit

    async def _claim(self, limit: int) -> tuple[list[ClaimedJob], float | None] | None:
        """Claim up to `limit` jobs in one statement; None if the fetch failed.

        Returns the jobs and, after a short fetch, the seconds until the next
        delayed job is due (None if none; 0 if the fetch set jobs aside that no
        worker runs, and this worker's own may wait behind more of them).

        A fetch whose reply is lost may still have committed, or commit later:
        its claim id is kept, and those jobs are given back (they never ran)
        once the session it ran in has ended, so they cannot stay ``running``
        under a live worker.
        """
        conn = await self._link.get()
        if self._unconfirmed and not await self._release_unconfirmed(conn):
            return None
        key = await self._session_lock_of(conn)
        if key is None:
            return None
        claim_id = str(uuid.uuid4())
        completed = self._completer.take_completions()
        started = time.monotonic()
        try:
            with anyio.fail_after(FETCH_TIMEOUT, shield=True):
                claimed, written, next_due = await _store.job_claim(
                    conn,
                    self._queue.statements,
                    queues=self._queues,
                    tasks=self._tasks,
                    limit=limit,
                    worker_id=self._worker_id,
                    claim_id=claim_id,
                    completed=completed,
                    keep_completed=self._keep_completed,
                )
        except RECONNECT_ON as ex:
            self._completer.give_back(completed)
            self._unconfirmed.append(_Unconfirmed(claim_id, key))
            await self._link.failed(conn, ex)
            return None
        except BaseException:
            self._completer.give_back(completed)
            raise
        self._link.succeeded()
        if completed:
            self._completer.written(completed, written, time.monotonic() - started)
        self.fetches += 1
        self.claimed += len(claimed)
        if self._queue.instrumentation is not None:
            self._queue.instrumentation.fetched(
                self._queues, len(claimed), time.monotonic() - started
            )
        return claimed, next_due

    async def _session_lock_of(self, conn: Connection[Any]) -> int | None:
        """The key of the session lock `conn` holds, taken before its first fetch;
        None if that failed (the connection is then given up)."""
        if self._session_lock is not None and self._session_lock[0] is conn:
            return self._session_lock[1]
        try:
            with anyio.fail_after(FETCH_TIMEOUT, shield=True):
                while True:
                    key = secrets.randbits(64) - 2**63  # any bigint
                    if await _store.fetch_session_start(
                        conn, self._queue.statements, key=key, idle_timeout=self._idle_timeout
                    ):
                        break
        except RECONNECT_ON as ex:
            await self._link.failed(conn, ex)
            return None
        self._session_lock = (conn, key)
        return key

    @property
    def lost_fetches(self) -> int:
        """Fetches whose replies were lost and whose claims are not given back yet."""
        return len(self._unconfirmed)

    async def _release_unconfirmed(self, conn: Connection[Any]) -> bool:
        """Give back the jobs of fetches whose replies were lost, once nothing can
        commit them any more; False if the connection failed.

        The connection may have been lost on this side only, and the server may
        still be running the fetch, blocked on a lock, say: given back now, the
        claim would find nothing, and the fetch could commit it afterwards. So
        a claim is given back once the session lock its connection held is
        free, which is when that session has ended (the server ends it soon
        after its client has gone: see `fetch_session_start`). Until then it
        stays pending, the worker fetches on, and it looks again at most every
        `PENDING_CHECK_INTERVAL` seconds.
        """
        if time.monotonic() < self._next_pending_check:
            return True
        self._next_pending_check = time.monotonic() + PENDING_CHECK_INTERVAL
        st = self._queue.statements
        try:
            with anyio.fail_after(FETCH_TIMEOUT, shield=True):
                ended = await _store.fetch_sessions_ended(
                    conn, st, keys=[lost.session_key for lost in self._unconfirmed]
                )
                for lost in [lost for lost in self._unconfirmed if lost.session_key in ended]:
                    released = await _store.job_release_claim(
                        conn, st, worker_id=self._worker_id, claim_id=lost.claim_id
                    )
                    # Removed once given back: if the connection fails first, it
                    # stays (giving a claim back twice changes nothing).
                    self._unconfirmed.remove(lost)
                    if released:
                        logger.warning(
                            "gave back %d jobs claimed by a fetch whose reply was lost",
                            released,
                            extra={
                                "event": "worker.claim_released",
                                "worker_id": self._worker_id,
                                "count": released,
                            },
                        )
        except RECONNECT_ON as ex:
            await self._link.failed(conn, ex)
            return False
        for lost in self._unconfirmed:  # their sessions go on
            if not lost.reported:
                lost.reported = True
                logger.warning(
                    "a fetch whose reply was lost may still run on the server: its claim is "
                    "given back once its session has ended",
                    extra={"event": "worker.lost_fetch_running", "worker_id": self._worker_id},
                )
        return True
