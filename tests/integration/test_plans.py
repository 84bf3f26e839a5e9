"""Plans that outlive an empty table.

PostgreSQL keeps one generic plan per prepared statement, made with the table
as large as it was then. A worker that starts on an idle queue, after an
autovacuum has truncated the jobs table to nothing, prepares its statements
on an empty table, where reading the whole table is the cheapest plan there
is; when a burst of jobs arrives, every fetch would keep reading it whole.

These tests prepare every statement on such a table (vacuumed and analyzed
while empty; autovacuum off so that nothing replans behind the test's back),
fill it without analyzing, run the statements again on the same connection,
and count the table's sequential scans in the transaction's statistics.
`plan_cache_mode = force_generic_plan` makes the first call use the plan that
PostgreSQL's own choice settles on after five calls on an empty table.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

import pgoutbox
from pgoutbox import JobState, Queue, TaskRef, _store
from pgoutbox._job import Outcome
from pgoutbox._sql import PlannedPerCall, Statements

pytestmark = pytest.mark.anyio

_FILL = 5_000
"""Jobs put in the table after the statements were prepared on it empty."""

_PLACEHOLDER = re.compile(rb"%\(\w+\)s|\$\d+")
_READS_JOBS = re.compile(rb'"\.(jobs\b|\w+\()')
"""A statement on the jobs table, or calling one of the schema's functions."""


def _ident(queue: Queue, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(queue.schema), sql.Identifier(table))


async def _worker_conn(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A connection like the worker's, that prepares each statement at its first call."""
    conn = await pgoutbox.connect(dsn, autocommit=True, prepare_threshold=0)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    return conn


async def _empty_and_vacuumed(queue: Queue, dsn: str) -> None:
    """The jobs table at its emptiest: no rows, no pages, statistics that say so."""
    async with await pgoutbox.connect(dsn, autocommit=True) as admin:
        jobs = _ident(queue, "jobs")
        await admin.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(jobs))
        await admin.execute(sql.SQL("VACUUM ANALYZE {}").format(jobs))


async def _fill(queue: Queue, dsn: str) -> None:
    """Waiting jobs, with no ANALYZE after them (as between two autoanalyze runs):
    `_FILL` due, as many delayed or retrying for later, and a few due of a task
    that no worker runs, among them (the fetch sets those aside, one row each)."""
    async with await pgoutbox.connect(dsn, autocommit=True) as admin:
        await admin.execute(
            sql.SQL(
                "INSERT INTO {} (queue, task, args, max_attempts, state, run_at)"
                " SELECT 'default', CASE WHEN g %% 50 = 0 AND k.state = 'available'"
                "                        THEN 'plans.nobody' ELSE 'plans.t' END,"
                "        '{{}}', 3, k.state::text::{}, now() + k.later"
                " FROM generate_series(1, %s) AS g,"
                " (VALUES ('available', interval '0'), ('scheduled', interval '1 day'),"
                "         ('retryable', interval '1 day')) AS k(state, later)"
            ).format(_ident(queue, "jobs"), _ident(queue, "job_state")),
            [_FILL],
        )


async def _reads(conn: psycopg.AsyncConnection[Any], queue: Queue) -> tuple[int, int]:
    """Sequential scans of the jobs table and rows its index scans fetched, that this
    session has not yet reported.

    PostgreSQL 15 reports a session's counts only between transactions, so
    the difference of two readings in one transaction is exact.
    """
    cur = await conn.execute(
        "SELECT seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relid = %s::regclass",
        [_ident(queue, "jobs").as_string(conn)],
    )
    row = await cur.fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


async def _run_prepared_statements(conn: psycopg.AsyncConnection[Any], st: Statements) -> set[str]:
    """Run every prepared statement that touches the jobs table; return their names."""
    worker, claim = str(uuid.uuid4()), str(uuid.uuid4())
    ref = TaskRef(name="plans.t")
    await _store.job_insert(conn, st, ref.bind(), channel="plans")
    await _store.job_insert(conn, st, ref.bind(), channel=None)
    keyed = TaskRef(name="plans.t", key="plans:1")
    await _store.job_insert(conn, st, keyed.bind(), channel="plans")
    await _store.job_insert(conn, st, keyed.bind(), channel=None)  # a duplicate
    await _store.job_insert_many(conn, st, [ref.bind(), ref.bind()], channel="plans")
    await _store.job_insert_many(
        conn, st, [ref.bind(), TaskRef(name="plans.t", priority=1).bind()], channel="plans"
    )
    claim_args: dict[str, Any] = {
        "queues": ["default"],
        "tasks": ["plans.t"],
        "limit": 4,
        "worker_id": worker,
    }
    jobs, _, _ = await _store.job_claim(conn, st, claim_id=claim, **claim_args)
    # A short fetch (of a queue with no jobs) also looks for the next delayed job.
    await _store.job_claim(conn, st, claim_id=claim, **(claim_args | {"queues": ["plans.none"]}))
    done = [Outcome(j.id, j.attempt, JobState.COMPLETED, claim_id=claim) for j in jobs]
    await _store.job_claim(
        conn, st, claim_id=claim, completed=done[:1], keep_completed=False, **claim_args
    )
    await _store.job_set_outcome_many(conn, st, done[1:2])
    retry = [msgspec.structs.replace(o, state=JobState.RETRYABLE, delay=1.0) for o in done[2:3]]
    await _store.job_set_outcome_many(conn, st, retry)
    if len(done) > 3:
        await _store.job_complete_fenced(conn, st, job_id=done[3].id, attempt=done[3].attempt)
    return {
        "job_insert",
        "job_insert_notify",
        "job_insert_unique",
        "job_insert_many",
        "job_insert_many_uniform",
        "job_claim",
        "job_complete_many",
        "job_set_outcome_many",
        "job_complete_fenced",
    }


async def _run_statements_planned_per_call(
    conn: psycopg.AsyncConnection[Any], queue: Queue, st: Statements
) -> None:
    worker, claim = str(uuid.uuid4()), str(uuid.uuid4())
    await _store.worker_heartbeat(conn, st, worker_id=worker)
    await _store.worker_rescue_expired(conn, st, schema=queue.schema, channel=queue.channel)
    await _store.job_prune(
        conn, st, schema=queue.schema, completed_retention=1, failed_retention=1, limit=10
    )
    await _store.job_release_claim(conn, st, worker_id=worker, claim_id=claim)
    await _store.job_get(conn, st, 1)
    await _store.job_cancel(conn, st, job_ids=[1], channel="plans", payload="x")
    await _store.status(conn, st)
    await _store.job_count_unfinished(conn, st, tasks=["plans.t"])
    await _store.worker_delete(
        conn, st, worker_id=worker, channel=queue.channel, queues=["default"]
    )


def _touching_jobs(st: Statements) -> dict[str, bytes]:
    """The statements that read or write the jobs table, by name."""
    named = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
    return {name: query for name, query in named.items() if _READS_JOBS.search(query)}


async def test_statements_prepared_on_an_empty_table_never_scan_it_once_filled(
    queue: Queue, database_dsn: str
) -> None:
    st = queue.statements
    await _empty_and_vacuumed(queue, database_dsn)
    async with await _worker_conn(database_dsn) as conn:
        prepared = await _run_prepared_statements(conn, st)
        await _fill(queue, database_dsn)
        async with conn.transaction():
            scans, fetched = await _reads(conn, queue)
            await _run_prepared_statements(conn, st)
            scans_after, fetched_after = await _reads(conn, queue)
    # They touch about ten jobs: a scan of the table, or a walk along a whole
    # index (which a join with the outcome list may choose), reads thousands.
    assert scans_after == scans
    assert fetched_after - fetched < _FILL // 10
    touching = _touching_jobs(st)
    per_call = {name for name, q in touching.items() if isinstance(q, PlannedPerCall)}
    assert set(touching) - per_call == prepared, "a prepared statement the test does not run"


async def test_a_plain_statement_prepared_on_an_empty_table_scans_it_once_filled(
    queue: Queue, database_dsn: str
) -> None:
    """The control: the set-up above does provoke the stale plan."""
    await _empty_and_vacuumed(queue, database_dsn)
    lookup = sql.SQL("SELECT id FROM {} WHERE id = %s").format(_ident(queue, "jobs"))
    async with await _worker_conn(database_dsn) as conn:
        await conn.execute(lookup, [1])
        await _fill(queue, database_dsn)
        async with conn.transaction():
            scans, _ = await _reads(conn, queue)
            await conn.execute(lookup, [1])
            assert (await _reads(conn, queue))[0] == scans + 1


async def test_statements_planned_per_call_are_never_prepared(
    queue: Queue, database_dsn: str
) -> None:
    st = queue.statements
    async with await _worker_conn(database_dsn) as conn:
        await _run_prepared_statements(conn, st)
        await _run_statements_planned_per_call(conn, queue, st)
        cur = await conn.execute("SELECT statement FROM pg_prepared_statements")
        held = {_PLACEHOLDER.sub(b"?", row[0].encode()) for row in await cur.fetchall()}
    for name, query in _touching_jobs(st).items():
        shape = _PLACEHOLDER.sub(b"?", query)
        assert (shape in held) != isinstance(query, PlannedPerCall), name
