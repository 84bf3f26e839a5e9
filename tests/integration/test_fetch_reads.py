"""A fetch reads what it may claim, not everything else that waits.

An idle worker's fetch is the statement behind every job it starts, and it
comes back short: after the claim it looks up when the next delayed job of its
queues and tasks is due. Neither part may walk past jobs that wait for later,
or that belong to other queues or tasks: with thousands of those, each fetch
would read thousands of index entries or rows. The tests count the buffers a
short fetch touches, from ``EXPLAIN (ANALYZE, BUFFERS)``, which counts those of
the function's inner statements too.

Jobs of a task that no registered worker runs are read once, and set aside
(`scheduled`, due) until a worker that runs it fetches them.
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


def _call(queue: Queue, max_jobs: int, task: str) -> tuple[sql.Composed, list[Any]]:
    """The worker's fetch for queue `default` and `task`, claiming up to `max_jobs`."""
    call = sql.SQL(
        "SELECT id, next_due FROM {}.fetch_jobs("
        "'{{}}', '{{}}', '{{}}', false, ARRAY['default'], ARRAY[%s], %s, %s, %s)"
    ).format(sql.Identifier(queue.schema))
    return call, [task, max_jobs, str(uuid.uuid4()), str(uuid.uuid4())]


async def _fetch(
    conn: psycopg.AsyncConnection[Any], queue: Queue, max_jobs: int
) -> tuple[int, list[tuple[Any, ...]]]:
    """Run the worker's fetch for queue `default`, task `reads.t`: (buffers, rows)."""
    call, args = _call(queue, max_jobs, "reads.t")
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


async def _claim(
    conn: psycopg.AsyncConnection[Any], queue: Queue, max_jobs: int, task: str
) -> tuple[list[int], float | None]:
    """Run the worker's fetch: (ids claimed, next_due)."""
    call, args = _call(queue, max_jobs, task)
    cur = await conn.execute(call, args)
    *claimed, last = await cur.fetchall()
    return [row[0] for row in claimed], last[1]


async def _register(
    conn: psycopg.AsyncConnection[Any], queue: Queue, task: str, q: str = "default"
) -> None:
    """A worker row for `task` in queue `q`."""
    await conn.execute(
        sql.SQL(
            "INSERT INTO {}.workers (id, hostname, pid, queues, tasks, concurrency)"
            " VALUES (%s, 'reads', 1, ARRAY[%s], ARRAY[%s], 4)"
        ).format(sql.Identifier(queue.schema)),
        [str(uuid.uuid4()), q, task],
    )


async def _states(conn: psycopg.AsyncConnection[Any], queue: Queue, task: str) -> dict[str, int]:
    cur = await conn.execute(
        sql.SQL(
            "SELECT state::text, count(*) FROM {} WHERE task = %s AND run_at <= now()"
            " GROUP BY state"
        ).format(_jobs(queue)),
        [task],
    )
    return {str(state): int(count) for state, count in await cur.fetchall()}


async def _wait(conn: psycopg.AsyncConnection[Any], queue: Queue, task: str, n: int) -> list[int]:
    """`n` due jobs of `task` in queue `default`, older than any job added later."""
    cur = await conn.execute(
        sql.SQL(
            "INSERT INTO {} (queue, task, args, run_at, max_attempts)"
            " SELECT 'default', %s, '{{}}', now() - interval '1 hour', 3"
            " FROM generate_series(1, %s) RETURNING id"
        ).format(_jobs(queue)),
        [task, n],
    )
    return [row[0] for row in await cur.fetchall()]


async def test_a_fetch_sets_aside_jobs_no_worker_runs_and_reads_past_them_no_more(
    queue: Queue, database_dsn: str
) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        await _register(conn, queue, "reads.t")
        await _wait(conn, queue, "reads.orphan", _FILL)  # no worker runs it, all ahead
        (mine,) = await _wait(conn, queue, "reads.t", 1)
        await conn.execute(
            sql.SQL("UPDATE {} SET run_at = now() WHERE id = %s").format(_jobs(queue)), [mine]
        )
        await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(_jobs(queue)))
        # The head of the queue is 10 of them: they are set aside with 1,000 more,
        # nothing is claimed, and the fetch says to fetch again at once.
        assert await _claim(conn, queue, 10, "reads.t") == ([], 0.0)
        assert await _states(conn, queue, "reads.orphan") == {
            "available": _FILL - 1_010,
            "scheduled": 1_010,
        }
        # Even with one free slot, a few more fetches set aside the rest and
        # reach the worker's job.
        fetches, claimed = 0, []
        while not claimed and fetches < 10:
            claimed, _ = await _claim(conn, queue, 1, "reads.t")
            fetches += 1
        assert (claimed, fetches) == ([mine], 5)
        assert await _states(conn, queue, "reads.orphan") == {"scheduled": _FILL}
        # From now on a fetch reads past none of them, once (auto)vacuum has
        # removed the index entries of the rows they were while available.
        await _wait(conn, queue, "reads.t", 1)
        await conn.execute(sql.SQL("VACUUM {}").format(_jobs(queue)))
        await _fetch(conn, queue, 0)
        buffers, running = await _fetch(conn, queue, 10)
        assert len(running) == 2, "the new job was claimed"
        assert buffers < _READ_AT_MOST, f"a fetch of one job touched {buffers} buffers"


async def test_jobs_set_aside_go_to_the_first_worker_that_runs_their_task(
    queue: Queue, database_dsn: str
) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        orphans = await _wait(conn, queue, "reads.orphan", 3)
        assert await _claim(conn, queue, 10, "reads.t") == ([], 0.0)
        assert await _states(conn, queue, "reads.orphan") == {"scheduled": 3}
        await _register(conn, queue, "reads.orphan")
        claimed, next_due = await _claim(conn, queue, 10, "reads.orphan")
        assert (sorted(claimed), next_due) == (orphans, None)


async def test_jobs_of_a_task_some_worker_runs_are_not_set_aside(
    queue: Queue, database_dsn: str
) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        await _register(conn, queue, "reads.other")
        await _wait(conn, queue, "reads.other", 3)
        (mine,) = await _wait(conn, queue, "reads.t", 1)
        claimed, next_due = await _claim(conn, queue, 10, "reads.t")
        assert (claimed, next_due) == ([mine], None)
        assert await _states(conn, queue, "reads.other") == {"available": 3}


async def test_only_workers_that_share_the_queue_keep_jobs_from_being_set_aside(
    queue: Queue, database_dsn: str
) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        await _register(conn, queue, "reads.orphan", "elsewhere")  # runs it, not here
        await _wait(conn, queue, "reads.orphan", 3)
        assert await _claim(conn, queue, 10, "reads.t") == ([], 0.0)
        assert await _states(conn, queue, "reads.orphan") == {"scheduled": 3}
