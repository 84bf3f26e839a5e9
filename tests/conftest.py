"""Fixtures: a throw-away database per session, a fresh schema per test, both backends."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from psycopg import sql

import pgoutbox

from ._postgres import server_dsn, with_dbname

# In CI, property tests replay the same examples every run (a red CI then means a
# change broke something, not that the dice found an old bug); locally they explore.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(
    params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")],
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(
    scope="module",
    params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")],
)
def blocking_portal(request: pytest.FixtureRequest) -> Iterator[BlockingPortal]:
    """An event loop in a thread on each backend, for sync (hypothesis) tests of async code."""
    with start_blocking_portal(str(request.param)) as portal:
        yield portal


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A DSN with rights to create databases."""
    with server_dsn() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def database_dsn(admin_dsn: str) -> Iterator[str]:
    """A database created for this test session, dropped at its end."""
    name = f"pgoutbox_test_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def schema() -> str:
    """A schema name no other test uses."""
    return f"t_{secrets.token_hex(6)}"


@pytest.fixture
async def queue(database_dsn: str, schema: str) -> AsyncIterator[pgoutbox.Queue]:
    """A migrated queue in a fresh schema, dropped after the test."""
    q = pgoutbox.Queue(database_dsn, schema=schema)
    await q.migrate()
    try:
        yield q
    finally:
        await q.aclose()
        async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


@pytest.fixture
async def conn(database_dsn: str) -> AsyncIterator[pgoutbox.Connection[tuple[object, ...]]]:
    """A producer connection (not autocommit: transactions are explicit or implicit)."""
    async with await pgoutbox.connect(database_dsn) as c:
        yield c
