"""A fetch reads what it may claim, not everything else that waits.

An idle worker's fetch is the statement behind every job it starts, and it
comes back short: after the claim it looks up when the next delayed job of its
queues and tasks is due. Neither part may walk past jobs that wait for later,
or that belong to other queues or tasks: with thousands of those, each fetch
would read thousands of index entries or rows. The tests count the buffers a
short fetch touches, from ``EXPLAIN (ANALYZE, BUFFERS)``, which counts those of
the function's inner statements too.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgoutbox
from pgoutbox import Queue

pytestmark = pytest.mark.anyio

_FILL = 5_000
"""Delayed jobs of each kind the fetch must not walk past."""

_READ_AT_MOST = 50
"""Buffers a short fetch may touch: a few index descents, the claimed row.
Walking past `_FILL` jobs touches hundreds (index entries) to thousands (rows)."""


def _jobs(queue: Queue) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(queue.schema), sql.Identifier("jobs"))


async def _delay(conn: psycopg.AsyncConnection[Any], queue: Queue, q: str, task: str) -> None:
    """`_FILL` jobs of `q` and `task`, due in a day or more."""
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (queue, task, args, state, run_at, max_attempts)"
            " SELECT %s, %s, '{{}}', 'scheduled', now() + interval '1 day' + g * interval '1 s', 3"
            " FROM generate_series(1, %s) AS g"
        ).format(_jobs(queue)),
        [q, task, _FILL],
    )


async def _fetch(
    conn: psycopg.AsyncConnection[Any], queue: Queue, max_jobs: int
) -> tuple[int, list[tuple[Any, ...]]]:
    """Run the worker's fetch for queue `default`, task `reads.t`: (buffers, rows)."""
    call = sql.SQL(
        "SELECT id, next_due FROM {}.fetch_jobs("
        "'{{}}', '{{}}', '{{}}', false, ARRAY['default'], ARRAY['reads.t'], %s, %s, %s)"
    ).format(sql.Identifier(queue.schema))
    args = [max_jobs, str(uuid.uuid4()), str(uuid.uuid4())]
    cur = await conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + call, args)
    row = await cur.fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    buffers = int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])
    # EXPLAIN ANALYZE ran the fetch; its rows are gone with its output.
    cur = await conn.execute(
        sql.SQL("SELECT id FROM {} WHERE state = 'running' ORDER BY id").format(_jobs(queue))
    )
    return buffers, await cur.fetchall()


async def test_a_short_fetch_reads_past_no_delayed_job(queue: Queue, database_dsn: str) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        await _delay(conn, queue, "default", "reads.t")  # its own, for later
        await _delay(conn, queue, "default", "reads.other")  # another task's
        await _delay(conn, queue, "elsewhere", "reads.t")  # another queue's
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (queue, task, args, max_attempts)"
                " VALUES ('default', 'reads.t', '{{}}', 3)"
            ).format(_jobs(queue))
        )
        await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(_jobs(queue)))
        # Warm the session's plans, so that only the fetch's own reads count.
        await _fetch(conn, queue, 0)
        buffers, running = await _fetch(conn, queue, 10)
        assert len(running) == 1, "the due job was claimed"
        assert buffers < _READ_AT_MOST, f"a fetch of one job touched {buffers} buffers"
        # And once nothing is due: the look-up of the next due time alone.
        buffers, _ = await _fetch(conn, queue, 10)
        assert buffers < _READ_AT_MOST, f"an empty fetch touched {buffers} buffers"


async def test_a_fetch_makes_due_delayed_jobs_available_then_claims_them(
    queue: Queue, database_dsn: str
) -> None:
    state = sql.SQL("{}.{}").format(sql.Identifier(queue.schema), sql.Identifier("job_state"))
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL(
                "INSERT INTO {} (queue, task, args, priority, state, run_at, max_attempts)"
                " SELECT 'default', 'reads.t', '{{}}', p, s::text::{}, now() - interval '1 s', 3"
                " FROM unnest(ARRAY[5, 0, 0, 0], ARRAY['available', 'scheduled', 'retryable',"
                " 'scheduled']) AS u(p, s)"
                " RETURNING id"
            ).format(_jobs(queue), state)
        )
        urgent, *delayed = [row[0] for row in await cur.fetchall()]
        # Two slots: the two oldest due delayed jobs become available, and the
        # claim takes the best two available jobs.
        _, running = await _fetch(conn, queue, 2)
        assert [row[0] for row in running] == [urgent, delayed[0]]
        cur = await conn.execute(
            sql.SQL("SELECT id, state::text FROM {} WHERE id = ANY(%s) ORDER BY id").format(
                _jobs(queue)
            ),
            [delayed[1:]],
        )
        assert await cur.fetchall() == [(delayed[1], "available"), (delayed[2], "scheduled")]
