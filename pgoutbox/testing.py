"""Helpers for testing code that uses pgoutbox.

Two ways to test, for two kinds of test:

- `capture` records jobs in memory instead of writing them: assert what was
  enqueued, then `Capture.run_all` runs the handlers with the worker's own
  rules (argument decoding, retries, signals, failures), including jobs those
  handlers enqueue. No database is needed for the jobs.
- `isolated` gives a copy of your queue in a fresh schema of a real database,
  dropped afterwards, and `drain` runs a real worker until nothing is due.

```python
from pgoutbox.testing import capture

async def test_sign_up_sends_welcome(conn):
    with capture(queue) as jobs:
        await sign_up(conn, "ada@example.com")
        jobs.assert_enqueued(send_welcome, user_id=1, email="ada@example.com")
        await jobs.run_all()  # inside the block, so jobs the handlers enqueue are captured
    assert jobs.states() == {"completed": 1}
```
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import anyio
import msgspec
from psycopg import sql

from . import _store
from ._context import JobContext
from ._job import CancelResult, ClaimedJob, Job, JobError, JobSpec, JobState, Outcome
from ._queue import Queue
from ._task import Task, TaskRef
from .errors import PgoutboxError
from .worker import Worker
from .worker._executor import execute

__all__ = ["Capture", "CapturedJob", "capture", "drain", "isolated"]

DEFAULT_MAX_ROUNDS: Final = 100
"""Rounds `Capture.run_all` runs before it decides jobs keep coming back forever."""

_WAITING: Final = frozenset({JobState.SCHEDULED, JobState.AVAILABLE, JobState.RETRYABLE})
_UNFINISHED: Final = _WAITING | {JobState.RUNNING}
_error_decoder = msgspec.json.Decoder(JobError)


class CapturedJob:
    """A job recorded by `capture`, with its state as the in-memory run left it.

    Attributes:
        id: a sequential id, unique within the capture.
        spec: what was enqueued.
        state: where the job is in its lifecycle.
        attempt: how many times it ran.
        max_attempts: the most attempts it gets (a snooze adds one).
        errors: the error of every failed attempt, oldest first.
        created_at: when it was captured (UTC).
    """

    def __init__(self, job_id: int, spec: JobSpec) -> None:
        self.id = job_id
        self.spec = spec
        self.state = JobState.AVAILABLE if spec.due_now() else JobState.SCHEDULED
        self.attempt = 0
        self.max_attempts = spec.max_attempts
        self.errors: list[JobError] = []
        self.created_at = datetime.now(UTC)
        self.run_at = spec.run_at or self.created_at + timedelta(seconds=spec.delay)
        """When the job is due (the same as `created_at` for a job due at once)."""

    def __repr__(self) -> str:
        return f"<CapturedJob {self.id} {self.spec.task!r} {self.state.value}>"

    @property
    def task(self) -> str:
        """The task name."""
        return self.spec.task

    @property
    def args(self) -> dict[str, Any]:
        """The arguments as they were encoded (decoded back to JSON values)."""
        decoded = msgspec.json.decode(self.spec.args)
        if not isinstance(decoded, dict):
            raise TypeError(f"job {self.id} holds non-object arguments: {decoded!r}")
        return decoded


class Capture:
    """The jobs a queue enqueued while `capture` was active; see the module docs.

    Attributes:
        jobs: the captured jobs, in the order they were enqueued.
    """

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self.jobs: list[CapturedJob] = []

    def _record(self, spec: JobSpec) -> Job:
        if spec.key is not None:  # as in the database: one unfinished job per key
            for held in self.jobs:
                if held.spec.key == spec.key and held.state in _UNFINISHED:
                    return Job(
                        id=held.id,
                        task=held.task,
                        queue=held.spec.queue,
                        run_at=held.run_at,
                        duplicate=True,
                    )
        job = CapturedJob(len(self.jobs) + 1, spec)
        self.jobs.append(job)
        return Job(id=job.id, task=spec.task, queue=spec.queue, run_at=job.run_at)

    def _cancel(self, job_ids: Sequence[int]) -> CancelResult:
        """`Queue.cancel` while capturing: waiting captured jobs become cancelled."""
        wanted = set(job_ids)
        cancelled = [job.id for job in self.jobs if job.id in wanted and job.state in _WAITING]
        for job in self.jobs:
            if job.id in cancelled:
                job.state = JobState.CANCELLED
        return CancelResult(cancelled=tuple(cancelled), requested=())

    def enqueued(self, task: Task[Any, Any] | TaskRef | str | None = None) -> list[CapturedJob]:
        """The captured jobs, all or those of one task."""
        if task is None:
            return list(self.jobs)
        name = task if isinstance(task, str) else task.name
        return [job for job in self.jobs if job.task == name]

    def assert_enqueued(
        self, task: Task[Any, Any] | TaskRef | str, /, *args: Any, **kwargs: Any
    ) -> CapturedJob:
        """Assert a job of `task` was enqueued with exactly these arguments; return it.

        With no arguments given, any job of `task` matches. For a `Task`, the
        arguments are bound and encoded as `enqueue` would, so defaults and
        types compare as they will be stored.

        Raises:
            AssertionError: no such job was enqueued (the message lists what was).
        """
        candidates = self.enqueued(task)
        if args or kwargs:
            if isinstance(task, Task):
                expected = msgspec.json.decode(task.bind(*args, **kwargs).args)
            else:
                expected = msgspec.json.decode(msgspec.json.encode(kwargs))
            candidates = [job for job in candidates if job.args == expected]
        if not candidates:
            name = task if isinstance(task, str) else task.name
            seen = [(job.task, job.spec.args) for job in self.jobs]
            raise AssertionError(
                f"no job of {name!r} enqueued with args={args!r} kwargs={kwargs!r}; "
                f"enqueued: {seen}"
            )
        return candidates[0]

    def states(self) -> dict[str, int]:
        """How many captured jobs are in each state."""
        return dict(Counter(job.state.value for job in self.jobs))

    async def run_all(self, *, max_rounds: int = DEFAULT_MAX_ROUNDS) -> None:
        """Run every waiting job of a registered task until none is left waiting.

        Each round runs the jobs waiting at its start, one at a time, with the
        worker's rules; retries, snoozes and delays do not wait. Jobs that
        handlers enqueue run in later rounds. Jobs of tasks this queue does not
        register stay waiting, as a real worker would leave them.

        Raises:
            PgoutboxError: jobs were still waiting after `max_rounds` rounds.
        """
        for _ in range(max_rounds):
            ready = [
                job for job in self.jobs if job.state in _WAITING and job.task in self._queue.tasks
            ]
            if not ready:
                return
            for job in ready:
                await self._run(job)
        raise PgoutboxError(f"jobs still waiting after {max_rounds} rounds: {self.jobs!r}")

    async def _run(self, job: CapturedJob) -> None:
        job.attempt += 1
        job.state = JobState.RUNNING
        claimed = ClaimedJob(
            id=job.id,
            queue=job.spec.queue,
            task=job.task,
            args=job.spec.args,
            priority=job.spec.priority,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            headers=None
            if not job.spec.headers
            else msgspec.json.encode(job.spec.headers).decode(),
        )
        task = self._queue.get_task(job.task)
        outcome = await execute(
            task, claimed, JobContext(self._queue, claimed), anyio.CancelScope()
        )
        self._apply(job, outcome)

    @staticmethod
    def _apply(job: CapturedJob, outcome: Outcome | None) -> None:
        if outcome is None:
            job.state = JobState.COMPLETED
            return
        job.state = outcome.state
        job.max_attempts += outcome.extra_attempts
        if outcome.error is not None:
            job.errors.append(_error_decoder.decode(outcome.error))


@contextmanager
def capture(queue: Queue) -> Iterator[Capture]:
    """Record the jobs `queue` enqueues in memory for the block, instead of writing them.

    While active, `Queue.enqueue` and its siblings validate arguments as usual
    but ignore the connection and write nothing; `Queue.cancel` cancels
    captured jobs, and `Queue.get_job` raises, as captured ids are not those
    of the database. A captured job stays captured even if the transaction it
    was enqueued in rolls back.
    """
    if queue._capture is not None:
        raise PgoutboxError(f"{queue!r} is already being captured")
    recorder = Capture(queue)
    queue._capture = recorder._record
    queue._capture_cancel = recorder._cancel
    try:
        yield recorder
    finally:
        queue._capture = None
        queue._capture_cancel = None


@asynccontextmanager
async def isolated(queue: Queue, *, conninfo: str | None = None) -> AsyncIterator[Queue]:
    """A copy of `queue` (same tasks) in a fresh, migrated schema, dropped afterwards.

    Args:
        queue: the application's queue.
        conninfo: the test database; defaults to the queue's.
    """
    copy = Queue(
        conninfo or queue.conninfo,
        schema=f"pgoutbox_test_{secrets.token_hex(6)}",
        notify=queue.notify,
    )
    copy._tasks = dict(queue._tasks)
    copy.instrumentation = queue.instrumentation
    await copy.migrate()
    try:
        yield copy
    finally:
        await copy.aclose()
        async with copy._dedicated_connection() as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(copy.schema))
            )


async def drain(queue: Queue, *, timeout: float = 30.0, **worker_options: Any) -> None:  # noqa: ASYNC109
    """Run a worker until no job of `queue`'s tasks is running or due, then stop it.

    The worker consumes the queues of the tasks and every queue that holds an
    unfinished job of theirs when `drain` starts (a job sent elsewhere with
    ``options(queue=...)``, due or not), unless `worker_options` name the
    `queues`.

    Args:
        queue: the queue whose jobs to run.
        timeout: seconds to wait at most; then `TimeoutError` is raised.
        **worker_options: passed to `Worker` (defaults poll every 50 ms).
    """
    tasks = sorted(queue.tasks)
    with anyio.fail_after(timeout):
        async with queue._dedicated_connection() as conn:
            options: dict[str, Any] = {"poll_interval": 0.05, **worker_options}
            if "queues" not in options and tasks:
                waiting = await _store.job_count_unfinished(conn, queue.statements, tasks=tasks)
                options["queues"] = sorted({*waiting, *(t.queue for t in queue.tasks.values())})
            worker = Worker(queue, **options)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                # The database is the only signal that everything finished.
                while any(  # noqa: ASYNC110
                    (
                        await _store.job_count_unfinished(conn, queue.statements, tasks=tasks)
                    ).values()
                ):
                    await anyio.sleep(0.05)
                worker.stop()
