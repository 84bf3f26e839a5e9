"""Migrations: from zero, re-run, many at once, and the schema check."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

import pgoutbox
from pgoutbox import Queue, SchemaError
from pgoutbox._sql import load_migrations

pytestmark = pytest.mark.anyio


async def _drop(database_dsn: str, schema: str) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )


async def _versions(conn: pgoutbox.Connection[Any], schema: str) -> list[int]:
    cur = await conn.execute(
        sql.SQL("SELECT version FROM {}.migrations ORDER BY version").format(sql.Identifier(schema))
    )
    return [row[0] for row in await cur.fetchall()]


async def test_migrate_from_zero_then_rerun_is_noop(database_dsn: str, schema: str) -> None:
    queue = Queue(database_dsn, schema=schema)
    latest = len(load_migrations(schema))
    try:
        with pytest.raises(SchemaError, match="not installed"):
            await queue.check_schema()
        assert await queue.migrate() == list(range(1, latest + 1))
        assert await queue.migrate() == []
        assert await queue.check_schema() == latest
        async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
            assert await _versions(conn, schema) == list(range(1, latest + 1))
    finally:
        await _drop(database_dsn, schema)


async def test_migrate_concurrently_applies_each_version_once(
    database_dsn: str, schema: str
) -> None:
    results: list[list[int]] = []

    async def migrate() -> None:
        results.append(await Queue(database_dsn, schema=schema).migrate())

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(migrate)
        applied = [r for r in results if r]
        assert len(results) == 8
        assert applied == [list(range(1, len(load_migrations(schema)) + 1))]
    finally:
        await _drop(database_dsn, schema)


async def test_check_schema_reports_old_version(database_dsn: str, schema: str) -> None:
    queue = Queue(database_dsn, schema=schema)
    try:
        await queue.migrate()
        async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DELETE FROM {}.migrations WHERE version > 1").format(
                    sql.Identifier(schema)
                )
            )
        with pytest.raises(SchemaError, match="version 1, this pgoutbox needs"):
            await queue.check_schema()
    finally:
        await _drop(database_dsn, schema)


async def test_migrate_names_are_identifiers_not_sql(database_dsn: str) -> None:
    with pytest.raises(pgoutbox.ConfigurationError, match="schema name"):
        Queue(database_dsn, schema='x"; DROP TABLE pg_class; --')


async def test_migrate_through_a_user_pool(database_dsn: str, schema: str) -> None:
    async with pgoutbox.Pool(database_dsn, max_size=2) as pool:
        queue = Queue(pool=pool, schema=schema)
        try:
            assert await queue.migrate() != []
            assert queue.conninfo == database_dsn
        finally:
            await _drop(database_dsn, schema)


async def test_migrated_tables_exist(queue: Queue) -> None:
    async with queue.connection() as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
            "ORDER BY table_name",
            [queue.schema],
        )
        assert [r[0] for r in await cur.fetchall()] == ["jobs", "migrations", "workers"]
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {}.jobs (queue, task, args, max_attempts) "
                    "VALUES ('q', 't', '{{}}', 0)"
                ).format(sql.Identifier(queue.schema))
            )


async def test_queue_adopts_a_pool_opened_later(database_dsn: str, schema: str) -> None:
    queue = Queue(database_dsn, schema=schema)
    async with pgoutbox.Pool(database_dsn, max_size=2) as pool:
        queue.use_pool(pool)
        async with queue.connection() as lent:
            pid = lent.info.backend_pid
        # The pool hands back its most recently returned connection: the same backend
        # proves the queue borrowed from `pool`, not from a pool of its own.
        async with pool.connection() as again:
            assert again.info.backend_pid == pid
    queue.use_pool(None)
    await queue.aclose()


async def test_fetch_candidates_is_planned_once_and_returns_the_fetch_order(queue: Queue) -> None:
    """The scan of due jobs keeps its plan for the session (PL/pgSQL, generic plan) with
    the settings that force the ordered index scan, and returns jobs highest priority
    first, then oldest, then lowest id, across queues, at most `max_jobs`."""
    schema = sql.Identifier(queue.schema)
    async with queue.connection() as conn:
        cur = await conn.execute(
            "SELECT l.lanname, p.proconfig FROM pg_proc p "
            "JOIN pg_language l ON l.oid = p.prolang "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.proname = 'fetch_candidates'",
            [queue.schema],
        )
        assert await cur.fetchall() == [
            (
                "plpgsql",
                [
                    "enable_bitmapscan=off",
                    "enable_seqscan=off",
                    "jit=off",
                    "plan_cache_mode=force_generic_plan",
                ],
            )
        ]
        await conn.execute(
            sql.SQL(
                "INSERT INTO {}.jobs (queue, task, args, max_attempts, priority, run_at) "
                "SELECT CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, 't', '{{}}', 1, "
                "CASE WHEN g % 5 = 0 THEN 1 ELSE 0 END, now() - (g % 3) * interval '1 s' "
                "FROM generate_series(1, 60) AS g"
            ).format(schema)
        )
        cur = await conn.execute(
            sql.SQL("SELECT id FROM {}.jobs ORDER BY priority DESC, run_at, id LIMIT 25").format(
                schema
            )
        )
        expected = [row[0] for row in await cur.fetchall()]
        # Several calls in one session: the later ones run the cached plan.
        for _ in range(3):
            async with conn.transaction():
                cur = await conn.execute(
                    sql.SQL("SELECT id FROM {}.fetch_candidates(%s, %s, %s)").format(schema),
                    [["a", "b"], ["t"], 25],
                )
                assert [row[0] for row in await cur.fetchall()] == expected
