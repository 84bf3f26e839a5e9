"""Hooks for tracing and metrics.

Subclass `Instrumentation`, override what you need (every hook is a no-op by
default) and pass instances to ``Queue(instrumentation=[...])``. Ready-made:
`pgoutbox.contrib.opentelemetry` and `pgoutbox.contrib.prometheus`.

Hooks run inline on the worker's and producer's tasks: keep them fast and
never let them block. An exception in a hook propagates (it is a bug to fix),
with the consequences of any failure at that point: raised in a worker's hook,
it stops the worker, and jobs whose outcomes were not written yet run again;
raised as `enqueuing` exits, after the jobs were written, a caller on an
autocommit connection that retries writes them twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from ._job import JobSpec, JobState

if TYPE_CHECKING:
    from ._context import JobContext

__all__ = ["Instrumentation"]


class Instrumentation:
    """Base class of instrumentation hooks; all are no-ops."""

    @contextmanager
    def enqueuing(self, specs: list[JobSpec]) -> Iterator[list[JobSpec]]:
        """Wrap the writing of jobs; yield the specs to write (e.g. with trace headers added).

        Called once per `Queue.enqueue` (one spec) or `Queue.enqueue_many` call.
        """
        yield specs

    @contextmanager
    def executing(self, job: JobContext) -> Iterator[None]:
        """Wrap one attempt of a handler, in the task that runs it."""
        yield

    def job_finished(self, job: JobContext, state: JobState, duration: float) -> None:
        """An attempt ended: `state` is what it leads to (completed, retryable, ...)."""

    def fetched(self, queues: Sequence[str], claimed: int, duration: float) -> None:
        """A fetch claimed `claimed` jobs in `duration` seconds."""

    def outcomes_written(self, count: int, duration: float) -> None:
        """The completer wrote `count` outcomes in one statement taking `duration` seconds."""

    def listening_changed(self, listening: bool) -> None:
        """The worker's LISTEN came up (True) or went down (False)."""


class _Fanout(Instrumentation):
    """Several instrumentations called in order (the enqueue/execute wrappers nest)."""

    def __init__(self, members: Sequence[Instrumentation]) -> None:
        self.members = tuple(members)

    @contextmanager
    def enqueuing(self, specs: list[JobSpec]) -> Iterator[list[JobSpec]]:
        with ExitStack() as stack:
            for member in self.members:
                specs = stack.enter_context(member.enqueuing(specs))
            yield specs

    @contextmanager
    def executing(self, job: JobContext) -> Iterator[None]:
        with ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.executing(job))
            yield

    def job_finished(self, job: JobContext, state: JobState, duration: float) -> None:
        for member in self.members:
            member.job_finished(job, state, duration)

    def fetched(self, queues: Sequence[str], claimed: int, duration: float) -> None:
        for member in self.members:
            member.fetched(queues, claimed, duration)

    def outcomes_written(self, count: int, duration: float) -> None:
        for member in self.members:
            member.outcomes_written(count, duration)

    def listening_changed(self, listening: bool) -> None:
        for member in self.members:
            member.listening_changed(listening)


def combine(members: Sequence[Instrumentation]) -> Instrumentation | None:
    """One instrumentation for many, or None when there are none (the fast path)."""
    if not members:
        return None
    return members[0] if len(members) == 1 else _Fanout(members)
