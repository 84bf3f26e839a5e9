"""The anyio connection layer: cancellation, closing, the pool, psycopg's internals."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import psycopg
import pytest
import trio

import pgoutbox
from pgoutbox import _store
from pgoutbox._connection import check_psycopg

pytestmark = pytest.mark.anyio


async def _active_sleeps(admin: pgoutbox.Connection[Any], pid: int) -> int:
    cur = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", [pid]
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_connection_cancelled_query_is_cancelled_on_server(database_dsn: str) -> None:
    async with (
        await pgoutbox.connect(database_dsn, autocommit=True) as conn,
        await pgoutbox.connect(database_dsn, autocommit=True) as admin,
    ):
        with anyio.move_on_after(0.2) as scope:
            await conn.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert not conn.closed
        assert await _active_sleeps(admin, conn.info.backend_pid) == 0
        cur = await conn.execute("SELECT 42")
        assert await cur.fetchone() == (42,)


async def test_connection_cancelled_transaction_rolls_back_and_stays_usable(
    database_dsn: str,
) -> None:
    async with await pgoutbox.connect(database_dsn) as conn:
        await conn.execute("CREATE TEMP TABLE t (x int)")
        await conn.commit()
        with anyio.move_on_after(0.2):
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.execute("SELECT pg_sleep(30)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        cur = await conn.execute("SELECT count(*) FROM t")
        assert await cur.fetchone() == (0,)


async def test_connection_close_wakes_task_blocked_in_notifies(database_dsn: str) -> None:
    conn = await pgoutbox.connect(database_dsn, autocommit=True)
    await conn.execute("LISTEN pgoutbox_test_close")
    first = anyio.Event()
    woke_with: list[type[BaseException]] = []

    async def listen() -> None:
        try:
            async for _ in conn.notifies():
                first.set()  # then it blocks again, waiting for the next one
        except psycopg.OperationalError as ex:
            woke_with.append(type(ex))

    with anyio.fail_after(10):
        async with (
            anyio.create_task_group() as tg,
            await pgoutbox.connect(database_dsn, autocommit=True) as sender,
        ):
            tg.start_soon(listen)
            await sender.execute("NOTIFY pgoutbox_test_close")
            await first.wait()
            await conn.close()
    assert woke_with == [psycopg.OperationalError]


async def test_connection_many_tasks_share_one_connection(database_dsn: str) -> None:
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        results: list[int] = []

        async def query(i: int) -> None:
            cur = await conn.execute("SELECT %s::int", [i])
            row = await cur.fetchone()
            assert row is not None
            results.append(row[0])

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(query, i)
        assert sorted(results) == list(range(50))


async def test_connection_pipeline_and_copy(database_dsn: str) -> None:
    async with await pgoutbox.connect(database_dsn) as conn:
        await conn.execute("CREATE TEMP TABLE c (x int)")
        async with conn.cursor() as cur, cur.copy("COPY c (x) FROM STDIN") as copy:
            for i in range(5000):
                await copy.write_row((i,))
        async with conn.pipeline():
            curs = [await conn.execute("SELECT %s::int", [i]) for i in range(20)]
        assert [(await c.fetchone()) for c in curs] == [(i,) for i in range(20)]
        cur = await conn.execute("SELECT count(*) FROM c")
        assert await cur.fetchone() == (5000,)


async def test_connection_pool_survives_cancellations(database_dsn: str) -> None:
    async with pgoutbox.Pool(database_dsn, max_size=4) as pool:

        async def work(i: int) -> None:
            with anyio.move_on_after(0.05 if i % 3 == 0 else 10):
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute("SELECT pg_sleep(%s)", [0.2 if i % 3 == 0 else 0.001])

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(work, i)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


def test_connection_psycopg_internals_present() -> None:
    check_psycopg()


def test_connection_psycopg_internal_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psycopg.AsyncConnection, "_cancel_gen", None)
    with pytest.raises(pgoutbox.IncompatiblePsycopgError, match="_cancel_gen"):
        check_psycopg()


def test_connection_stock_psycopg_still_fails_under_trio(database_dsn: str) -> None:
    """Trip-wire: when this starts passing, psycopg gained trio support upstream."""

    async def stock_connect() -> None:
        conn = await psycopg.AsyncConnection.connect(database_dsn)
        await conn.close()

    with pytest.raises(RuntimeError, match="no running event loop"):
        trio.run(stock_connect)
    assert "trio" in sys.modules


@pytest.mark.parametrize("values", [[], [1], [0, 2**63 - 1, 7, 7]])
async def test_integer_array_literals_arrive_as_sent(database_dsn: str, values: list[int]) -> None:
    """The worker's id and attempt arrays skip psycopg's list dumper: same values,
    same types, prepared or not."""
    attempts = [v % 2**31 for v in values]
    async with await pgoutbox.connect(database_dsn, autocommit=True) as conn:
        for prepare in (False, True):
            cur = await conn.execute(
                "SELECT %s::bigint[], %s::integer[], pg_typeof(%s), pg_typeof(%s)",
                [
                    _store._BigintArray(values),
                    _store._IntegerArray(attempts),
                    _store._BigintArray(values),
                    _store._IntegerArray(attempts),
                ],
                prepare=prepare,
            )
            assert await cur.fetchone() == (values, attempts, "bigint[]", "integer[]")
