"""OpenTelemetry tracing: a span per enqueue and per attempt, linked across processes.

Install ``pgoutbox[opentelemetry]`` and pass ``OpenTelemetryInstrumentation()``
to ``Queue(instrumentation=[...])``. Enqueue opens a PRODUCER span
``send <queue>`` and stores the trace context in the job's headers; the worker
opens a CONSUMER span ``process <queue>`` as its child, so one trace follows
a request into its background jobs. Attributes follow OpenTelemetry's
messaging semantic conventions (``messaging.system`` is ``pgoutbox``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import msgspec
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._context import JobContext
from .._job import JobSpec, JobState
from ..instrumentation import Instrumentation

__all__ = ["OpenTelemetryInstrumentation"]

SYSTEM: Final = "pgoutbox"
"""The value of ``messaging.system`` on every span."""

_FAILED_STATES: Final = frozenset({JobState.FAILED, JobState.RETRYABLE})


class OpenTelemetryInstrumentation(Instrumentation):
    """Trace enqueues and job executions with OpenTelemetry.

    Args:
        tracer_provider: the provider to get the tracer from; the global one by default.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("pgoutbox", tracer_provider=tracer_provider)

    @contextmanager
    def enqueuing(self, specs: list[JobSpec]) -> Iterator[list[JobSpec]]:
        """A PRODUCER span around the write; trace context goes into each job's headers."""
        destination = specs[0].queue if len({s.queue for s in specs}) == 1 else "multiple"
        attributes: dict[str, str | int] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": destination,
        }
        if len(specs) > 1:
            attributes["messaging.batch.message_count"] = len(specs)
        with self._tracer.start_as_current_span(
            f"send {destination}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            if not carrier:
                yield specs
                return
            yield [
                msgspec.structs.replace(spec, headers={**(spec.headers or {}), **carrier})
                for spec in specs
            ]

    @contextmanager
    def executing(self, job: JobContext) -> Iterator[None]:
        """A CONSUMER span around the attempt, a child of the enqueue's span."""
        parent = propagate.extract(job.headers)
        with self._tracer.start_as_current_span(
            f"process {job.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": job.queue,
                "messaging.message.id": str(job.id),
                "pgoutbox.task": job.task,
                "pgoutbox.attempt": job.attempt,
            },
        ):
            yield

    def job_finished(self, job: JobContext, state: JobState, duration: float) -> None:
        """Record the attempt's outcome on its span (current while `executing` is open)."""
        span = trace.get_current_span()
        span.set_attribute("pgoutbox.outcome", state.value)
        if state in _FAILED_STATES:
            span.set_status(Status(StatusCode.ERROR, f"attempt {job.attempt} {state.value}"))
