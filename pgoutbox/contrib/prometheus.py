"""Prometheus metrics for workers and queues.

Install ``pgoutbox[prometheus]`` and pass ``PrometheusInstrumentation()`` to
``Queue(instrumentation=[...])``; expose them as you expose your other
metrics (e.g. ``prometheus_client.start_http_server``). The worker-side metrics
count what this process does; `PrometheusInstrumentation.collect_queue_states`
sets gauges of jobs by queue and state from the database, for one process to
call periodically.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import REGISTRY

from .._context import JobContext
from .._job import JobState
from .._queue import Queue
from ..instrumentation import Instrumentation

__all__ = ["PrometheusInstrumentation"]

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class PrometheusInstrumentation(Instrumentation):
    """Counters, histograms and gauges for pgoutbox, prefixed ``pgoutbox_``.

    Args:
        registry: where to register the metrics; the default registry by default.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.attempts = Counter(
            "pgoutbox_job_attempts",
            "Attempts finished by this process, by the state they led to.",
            ["queue", "task", "state"],
            registry=registry,
        )
        self.duration = Histogram(
            "pgoutbox_job_duration_seconds",
            "How long attempts ran.",
            ["queue", "task"],
            registry=registry,
        )
        self.fetch_size = Histogram(
            "pgoutbox_fetch_batch_size",
            "Jobs claimed per fetch.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.write_size = Histogram(
            "pgoutbox_outcome_batch_size",
            "Outcomes written per statement.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.listening = Gauge(
            "pgoutbox_listener_up",
            "1 while the worker's LISTEN is in place, else 0 (it polls).",
            registry=registry,
        )
        self.jobs = Gauge(
            "pgoutbox_jobs",
            "Jobs by queue and state, as of the last collect_queue_states().",
            ["queue", "state"],
            registry=registry,
        )
        self.oldest_due = Gauge(
            "pgoutbox_oldest_due_job_age_seconds",
            "How long the oldest due, unclaimed job has waited, per queue.",
            ["queue"],
            registry=registry,
        )
        self._jobs_labels: set[tuple[str, str]] = set()  # as of the last collect_queue_states

    def job_finished(self, job: JobContext, state: JobState, duration: float) -> None:
        """Count the attempt and observe its duration."""
        self.attempts.labels(job.queue, job.task, state.value).inc()
        self.duration.labels(job.queue, job.task).observe(duration)

    def fetched(self, queues: Sequence[str], claimed: int, duration: float) -> None:
        """Observe the fetch's batch size."""
        self.fetch_size.observe(claimed)

    def outcomes_written(self, count: int, duration: float) -> None:
        """Observe the outcome batch size."""
        self.write_size.observe(count)

    def listening_changed(self, listening: bool) -> None:
        """Track whether the LISTEN is up."""
        self.listening.set(1 if listening else 0)

    async def collect_queue_states(self, queue: Queue) -> None:
        """Set the per-queue gauges from the database (runs `Queue.status`)."""
        report = await queue.status()
        # Set the new values first, then drop the queues that have no jobs left:
        # a scrape (from another thread) in between sees old or new values,
        # never none.
        jobs: set[tuple[str, str]] = set()
        for counts in report.queues:
            for state in JobState:
                self.jobs.labels(counts.queue, state.value).set(counts.counts.get(state, 0))
                jobs.add((counts.queue, state.value))
            self.oldest_due.labels(counts.queue).set(counts.oldest_due_age or 0.0)
        for queue_name, state_name in self._jobs_labels - jobs:
            self.jobs.remove(queue_name, state_name)
        for queue_name in {q for q, _ in self._jobs_labels} - {q for q, _ in jobs}:
            self.oldest_due.remove(queue_name)
        self._jobs_labels = jobs
