"""jsonb or bytea for job payloads? Insert and fetch+decode cost, side by side.

Run: ``python benchmarks/bench_payload.py [--dsn DSN] [--rows 50000] [--runs 5]``.

Three tables differ only in the payload column: ``jsonb`` (parsed into a binary
form on insert; queryable in SQL), ``json`` (the text as written, syntax-checked;
readable, and castable to jsonb in a query) and ``bytea`` (msgpack bytes). Each run inserts
`rows` payloads in batches of 1,000 through ``unnest`` (as ``enqueue_many``
does) and then fetches all rows and decodes them with msgspec (as a worker
does); the two layouts alternate within each run, in a throw-away database.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from _scratch import add_dsn_option, throwaway_database
from psycopg import sql

import pgoutbox

BATCH = 1000


class Payload(msgspec.Struct):
    order_id: int
    customer: str
    amount: float
    items: list[str]


def _payloads(n: int) -> list[Payload]:
    return [
        Payload(order_id=i, customer=f"customer-{i % 977}", amount=i * 1.25, items=["a", "b"])
        for i in range(n)
    ]


async def _timed(fn: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def _run_layout(
    conn: pgoutbox.Connection[Any], layout: str, data: list[Payload]
) -> tuple[float, float]:
    table = sql.Identifier(f"payload_{layout}")
    await conn.execute(sql.SQL("TRUNCATE {}").format(table))
    if layout in ("jsonb", "json"):
        encoded: list[Any] = [msgspec.json.encode(p).decode() for p in data]
        cast = sql.SQL(layout)
        insert = sql.SQL("INSERT INTO {} (args) SELECT a::{} FROM unnest(%s::text[]) a").format(
            table, cast
        )
        select = sql.SQL("SELECT args::text FROM {}").format(table)
        decoder: Any = msgspec.json.Decoder(Payload)
    else:
        encoded = [msgspec.msgpack.encode(p) for p in data]
        insert = sql.SQL("INSERT INTO {} (args) SELECT a FROM unnest(%s::bytea[]) a").format(table)
        select = sql.SQL("SELECT args FROM {}").format(table)
        decoder = msgspec.msgpack.Decoder(Payload)

    async def write() -> None:
        for start in range(0, len(encoded), BATCH):
            async with conn.transaction():
                await conn.execute(insert, [encoded[start : start + BATCH]])

    async def read() -> None:
        cur = await conn.execute(select)
        for (raw,) in await cur.fetchall():
            decoder.decode(raw)

    return await _timed(write), await _timed(read)


async def main(dsn: str, rows: int, runs: int) -> None:
    async with (
        throwaway_database(dsn, "pgoutbox_payload_") as db,
        await pgoutbox.connect(db, autocommit=True) as conn,
    ):
        await conn.execute("CREATE TABLE payload_jsonb (id bigserial PRIMARY KEY, args jsonb)")
        await conn.execute("CREATE TABLE payload_json (id bigserial PRIMARY KEY, args json)")
        await conn.execute("CREATE TABLE payload_bytea (id bigserial PRIMARY KEY, args bytea)")
        data = _payloads(rows)
        layouts = ("jsonb", "json", "bytea")
        results: dict[str, list[tuple[float, float]]] = {layout: [] for layout in layouts}
        for _ in range(runs):
            for layout in layouts:
                results[layout].append(await _run_layout(conn, layout, data))
        cur = await conn.execute(
            "SELECT pg_total_relation_size('payload_jsonb'), "
            "pg_total_relation_size('payload_json'), pg_total_relation_size('payload_bytea')"
        )
        sizes = await cur.fetchone()
    print(f"{rows} payloads, batches of {BATCH}, {runs} runs (median, min-max)")
    print(f"{'layout':8} {'insert rows/s':>22} {'fetch+decode rows/s':>24}")
    for layout, samples in results.items():
        ins = [rows / s[0] for s in samples]
        rd = [rows / s[1] for s in samples]
        print(
            f"{layout:8} {statistics.median(ins):>10,.0f} ({min(ins):,.0f}-{max(ins):,.0f})"
            f" {statistics.median(rd):>12,.0f} ({min(rd):,.0f}-{max(rd):,.0f})"
        )
    if sizes:
        print(
            f"table size: jsonb {sizes[0] / 1e6:.1f} MB, json {sizes[1] / 1e6:.1f} MB, "
            f"bytea {sizes[2] / 1e6:.1f} MB"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_option(parser)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    anyio.run(main, args.dsn, args.rows, args.runs)
