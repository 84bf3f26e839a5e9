"""Checked by mypy in tests/unit/test_typing.py; lines marked `# E:` must be errors."""

from __future__ import annotations

import psycopg

import pgoutbox

queue = pgoutbox.Queue("", schema="typing")


@queue.task
async def charge(order_id: int, amount: float = 0.0) -> None: ...


async def producer(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    await queue.enqueue(conn, charge, 7)
    await queue.enqueue(conn, charge, 7, amount=1.5)
    await queue.enqueue(conn, charge.options(delay=5), order_id=7)
    await queue.enqueue(conn, "billing.charge", order_id=7)
    job: pgoutbox.Job = await queue.enqueue(conn, charge, 7)
    await queue.enqueue(conn, charge, "seven")  # E: call-overload
    await queue.enqueue(conn, charge)  # E: call-overload
    await queue.enqueue(conn, charge, 7, colour="red")  # E: call-arg
    await queue.enqueue(conn, charge, 7, amount="lots")  # E: arg-type
    del job
