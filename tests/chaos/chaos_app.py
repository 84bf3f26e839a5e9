"""The tasks of the chaos test: one at-least-once, one exactly-once.

Workers import this module (``tests/chaos/chaos_worker.py``, or
``python -m pgoutbox.worker tests.chaos.chaos_app:queue`` from the repository
root); the test imports it to enqueue. The queue reads ``$PGOUTBOX_DSN`` and
its schema from ``$PGOUTBOX_CHAOS_SCHEMA``.

* `plain` records each run as a row ``(job_id, attempt)`` in ``runs_plain``,
  committed on a connection of its own before the handler returns: a run the
  queue repeats shows up as a second row.
* `exactly_once` records each run in ``runs_once`` the same way (so repeated
  executions are visible), then writes its effect to ``effects_once`` inside
  ``current_job().transaction()``, which commits it together with the job's
  completion: whatever happens, one row per job.

Neither table has a unique constraint: a duplicate must be counted, not refused.
Short random pauses keep jobs in flight when a fault strikes.
"""

from __future__ import annotations

import functools
import os
import random
from typing import Final

import anyio
from psycopg import sql

import pgoutbox
from pgoutbox import RetryPolicy, current_job

__all__ = ["SCHEMA_ENV", "TABLES", "exactly_once", "plain", "queue"]

SCHEMA_ENV: Final = "PGOUTBOX_CHAOS_SCHEMA"

TABLES: Final = """
CREATE TABLE IF NOT EXISTS runs_plain (
    job_id bigint NOT NULL, attempt integer NOT NULL, n integer NOT NULL, pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS runs_once (
    job_id bigint NOT NULL, attempt integer NOT NULL, n integer NOT NULL, pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS effects_once (
    job_id bigint NOT NULL, attempt integer NOT NULL, n integer NOT NULL, pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""
"""The tables the handlers write to (public schema), created by the test."""

MAX_PAUSE: Final = 0.15
"""The longest random pause inside a handler, in seconds."""

CONCURRENCY: Final = 8
"""Jobs a chaos worker runs at once (also the size of the handlers' own pool)."""

RETRY: Final = RetryPolicy(max_attempts=1000, initial_interval=0.05, max_interval=1.0)
"""Retry quickly and practically forever: every fault must end in completion, not failure."""

queue = pgoutbox.Queue(schema=os.environ.get(SCHEMA_ENV, "chaos"))


_INSERT: Final = "INSERT INTO {} (job_id, attempt, n, pid) VALUES (%s, %s, %s, %s)"


@functools.cache
def _own_pool() -> pgoutbox.Pool:
    """The handlers' own connections (not the queue's), made on first use in the worker."""
    return pgoutbox.Pool(queue.conninfo, max_size=CONCURRENCY, application_name="chaos-handler")


async def _record_run(table: str, n: int) -> None:
    """Commit a row saying this attempt of the current job ran (autocommit, own connection)."""
    job = current_job()
    async with _own_pool().connection() as conn:
        await conn.execute(
            sql.SQL(_INSERT).format(sql.Identifier(table)), [job.id, job.attempt, n, os.getpid()]
        )


@queue.task(name="chaos.plain", retry=RETRY)
async def plain(n: int) -> None:
    """At least once: the run's row may be committed more than once."""
    await anyio.sleep(random.uniform(0, MAX_PAUSE))
    await _record_run("runs_plain", n)
    await anyio.sleep(random.uniform(0, MAX_PAUSE))  # a window between effect and ack


@queue.task(name="chaos.exactly_once", retry=RETRY)
async def exactly_once(n: int) -> None:
    """Exactly once: the effect commits with the completion, fenced by the attempt."""
    await _record_run("runs_once", n)
    job = current_job()
    async with job.transaction() as conn:
        await conn.execute(
            sql.SQL(_INSERT).format(sql.Identifier("effects_once")),
            [job.id, job.attempt, n, os.getpid()],
        )
        await anyio.sleep(random.uniform(0, MAX_PAUSE))  # the effect is written, not committed
