"""Instrumentation: OpenTelemetry traces across enqueue and execution, Prometheus metrics."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from psycopg import sql

import pgoutbox
from pgoutbox import Queue, RetryPolicy, Worker, current_job
from pgoutbox.contrib.opentelemetry import OpenTelemetryInstrumentation
from pgoutbox.contrib.prometheus import PrometheusInstrumentation

from ._running import Recorder, running

pytestmark = pytest.mark.anyio


async def test_opentelemetry_execution_span_continues_the_producer_trace(
    database_dsn: str, schema: str, conn: pgoutbox.Connection[Any]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    queue = Queue(
        database_dsn, schema=schema, instrumentation=[OpenTelemetryInstrumentation(provider)]
    )
    seen = Recorder()

    @queue.task(queue="mail")
    async def send(to: str) -> None:
        seen.record(current_job().headers)

    await queue.migrate()
    async with running(Worker(queue, poll_interval=0.05)):
        with tracer.start_as_current_span("POST /signup") as request:
            async with conn.transaction():
                job = await queue.enqueue(conn, send, "a@example.com")
        (headers,) = await seen.wait_for(1)
    assert "traceparent" in headers
    spans = {s.name: s for s in exporter.get_finished_spans()}
    send_span, process_span = spans["send mail"], spans["process mail"]
    assert send_span.kind is SpanKind.PRODUCER
    assert process_span.kind is SpanKind.CONSUMER
    assert send_span.parent is not None
    assert send_span.parent.span_id == request.get_span_context().span_id
    assert process_span.parent is not None
    assert process_span.parent.span_id == send_span.context.span_id
    assert process_span.context.trace_id == request.get_span_context().trace_id
    assert process_span.attributes is not None
    assert process_span.attributes["messaging.message.id"] == str(job.id)
    assert process_span.attributes["pgoutbox.outcome"] == "completed"


async def test_prometheus_counts_attempts_batches_and_queue_states(
    database_dsn: str, schema: str, conn: pgoutbox.Connection[Any]
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusInstrumentation(registry)
    queue = Queue(database_dsn, schema=schema, instrumentation=[metrics])
    seen = Recorder()

    @queue.task(retry=RetryPolicy(max_attempts=1))
    async def work(ok: bool) -> None:
        seen.record(ok)
        if not ok:
            raise ValueError("no")

    await queue.migrate()
    worker = Worker(queue, poll_interval=0.05)
    async with running(worker):
        async with conn.transaction():
            await queue.enqueue_many(conn, [work.bind(ok=True)] * 3 + [work.bind(ok=False)])
        await seen.wait_for(4)
        await worker.wait_listening()
        assert registry.get_sample_value("pgoutbox_listener_up") == 1
    task = work.name
    sample = registry.get_sample_value
    assert (
        sample(
            "pgoutbox_job_attempts_total", {"queue": "default", "task": task, "state": "completed"}
        )
        == 3
    )
    assert (
        sample("pgoutbox_job_attempts_total", {"queue": "default", "task": task, "state": "failed"})
        == 1
    )
    assert (sample("pgoutbox_fetch_batch_size_sum") or 0) >= 4
    assert (sample("pgoutbox_outcome_batch_size_sum") or 0) == 4
    await metrics.collect_queue_states(queue)
    assert sample("pgoutbox_jobs", {"queue": "default", "state": "completed"}) == 3
    assert sample("pgoutbox_jobs", {"queue": "default", "state": "failed"}) == 1
    assert sample("pgoutbox_jobs", {"queue": "default", "state": "available"}) == 0


async def test_prometheus_queue_states_never_vanish_while_they_are_collected(
    queue: Queue, conn: pgoutbox.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scrape runs in another thread: one between dropping the old series and
    # setting the new ones saw no series at all.
    registry = CollectorRegistry()
    metrics = PrometheusInstrumentation(registry)

    @queue.task
    async def work() -> None: ...

    async with conn.transaction():
        await queue.enqueue(conn, work)
        gone = await queue.enqueue(conn, work.options(queue="gone"))
    await metrics.collect_queue_states(queue)
    available = {"queue": "default", "state": "available"}
    assert registry.get_sample_value("pgoutbox_jobs", available) == 1
    async with conn.transaction():
        await queue.cancel(conn, gone.id)
    await conn.execute(
        sql.SQL("DELETE FROM {} WHERE queue = 'gone'").format(sql.Identifier(queue.schema, "jobs"))
    )
    await conn.commit()
    scraped: list[float | None] = []
    set_value = metrics.jobs.labels

    def labels(*values: str) -> Any:
        scraped.append(registry.get_sample_value("pgoutbox_jobs", available))
        return set_value(*values)

    monkeypatch.setattr(metrics.jobs, "labels", labels)
    await metrics.collect_queue_states(queue)
    assert scraped
    assert None not in scraped
    assert registry.get_sample_value("pgoutbox_jobs", available) == 1
    assert (
        registry.get_sample_value("pgoutbox_jobs", {"queue": "gone", "state": "cancelled"}) is None
    )
    assert (
        registry.get_sample_value("pgoutbox_oldest_due_job_age_seconds", {"queue": "gone"}) is None
    )
