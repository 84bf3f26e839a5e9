"""Enqueue in a SQLAlchemy session's transaction, with an async and a sync session.

Run it with ``python examples/sqlalchemy_recipe.py``. It uses ``$PGOUTBOX_DSN``, or
the local server at 127.0.0.1:5432 (user postgres, database test).

The recipe: take the psycopg connection under the session's transaction and
enqueue on it. The job then commits with the session, or rolls back with it.
Use the ``postgresql+psycopg`` dialect (psycopg 3), and ``flush()`` first when
the job needs ids the database generates.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import pgoutbox
from pgoutbox.testing import drain

DSN: Final = os.environ.get("PGOUTBOX_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")

queue = pgoutbox.Queue(DSN, schema="example_sqlalchemy")


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "example_sqlalchemy_invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]
    amount_cents: Mapped[int]


@queue.task(name="billing.email_invoice", queue="billing")
async def email_invoice(invoice_id: int, customer: str) -> None:
    print(f"  worker: invoice {invoice_id} emailed to {customer}")


# -- the recipe ------------------------------------------------------------------


async def psycopg_connection(session: AsyncSession) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection that runs `session`'s transaction (which this begins if needed)."""
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, psycopg.AsyncConnection):
        raise TypeError(f"expected the postgresql+psycopg dialect, got a {type(driver)} connection")
    return driver


def psycopg_sync_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection that runs `session`'s transaction (which this begins if needed)."""
    driver = session.connection().connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"expected the postgresql+psycopg dialect, got a {type(driver)} connection")
    return driver


# -- using it ------------------------------------------------------------------


async def bill_async(
    sessions: async_sessionmaker[AsyncSession], customer: str, *, commit: bool
) -> pgoutbox.Job:
    """An invoice and its email job in one AsyncSession transaction, then commit or roll back."""
    async with sessions() as session:
        invoice = Invoice(customer=customer, amount_cents=1999)
        session.add(invoice)
        await session.flush()  # INSERT now: the job needs the invoice's id
        job = await queue.enqueue(
            await psycopg_connection(session), email_invoice, invoice.id, customer
        )
        print(f"async: invoice {invoice.id} and job {job.id} written, not committed")
        if commit:
            await session.commit()
            print(f"async: committed invoice {invoice.id} and job {job.id}")
        else:
            await session.rollback()
            print(f"async: rolled back invoice {invoice.id} and job {job.id}")
        return job


def bill_sync(sessions: sessionmaker[Session], customer: str, *, commit: bool) -> pgoutbox.Job:
    """The same with a sync Session, e.g. in a Flask handler or a script."""
    with sessions() as session:
        invoice = Invoice(customer=customer, amount_cents=2999)
        session.add(invoice)
        session.flush()
        job = queue.enqueue_sync(
            psycopg_sync_connection(session), email_invoice, invoice.id, customer
        )
        print(f"sync: invoice {invoice.id} and job {job.id} written, not committed")
        if commit:
            session.commit()
            print(f"sync: committed invoice {invoice.id} and job {job.id}")
        else:
            session.rollback()
            print(f"sync: rolled back invoice {invoice.id} and job {job.id}")
        return job


async def report(label: str, job: pgoutbox.Job) -> None:
    """Look the job up from another connection: only a committed job is there."""
    record = await queue.get_job(job.id)
    print(f"{label}: job {job.id} {record.state.value if record else 'does not exist'}")


async def main() -> None:
    await queue.migrate()
    # Your engines; usually create_async_engine("postgresql+psycopg://user@host/db").
    connect_args = conninfo_to_dict(DSN)
    async_engine = create_async_engine("postgresql+psycopg://", connect_args=connect_args)
    sync_engine = create_engine("postgresql+psycopg://", connect_args=connect_args)
    try:
        async with async_engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)  # CREATE TABLE unless it exists

        async_sessions = async_sessionmaker(async_engine, expire_on_commit=False)
        job = await bill_async(async_sessions, "ada@example.com", commit=True)
        await report("async commit", job)
        job = await bill_async(async_sessions, "mallory@example.com", commit=False)
        await report("async rollback", job)

        sync_sessions = sessionmaker(sync_engine, expire_on_commit=False)
        # Sync code blocks: run it in a thread, as an async app would.
        job = await asyncio.to_thread(bill_sync, sync_sessions, "grace@example.com", commit=True)
        await report("sync commit", job)
        job = await asyncio.to_thread(bill_sync, sync_sessions, "mallory@example.com", commit=False)
        await report("sync rollback", job)

        await drain(queue, timeout=15)  # run the committed jobs with an in-process worker
    finally:
        await queue.aclose()
        await async_engine.dispose()
        sync_engine.dispose()
    print("done: 2 invoices emailed, none to mallory@example.com")


if __name__ == "__main__":
    asyncio.run(main())
