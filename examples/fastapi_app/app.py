"""The web app: an order and its receipt job are written in one transaction.

Serve it with ``uvicorn examples.fastapi_app.app:app`` (from the repository root),
next to a worker: ``python -m pgoutbox.worker examples.fastapi_app.tasks:queue``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Request, status
from psycopg.rows import class_row, scalar_row
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from .tasks import DSN, queue, send_receipt

CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS example_fastapi_orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL,
    amount_cents integer NOT NULL CHECK (amount_cents > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    receipt_sent_at timestamptz
)
"""
"""The app's table; `run_demo` creates it (a real app has migrations for this)."""

DECLINED_CARD = "4000000000000002"
"""The payment stand-in declines this card number (as Stripe's test mode does)."""


class NewOrder(BaseModel):
    email: str
    amount_cents: int = Field(gt=0)
    card: str


class OrderPlaced(BaseModel):
    id: int
    receipt_job_id: int


class Order(BaseModel):
    id: int
    email: str
    amount_cents: int
    receipt_sent_at: datetime | None


class CardDeclinedError(Exception):
    """The payment stand-in refused the card."""


def charge_card(card: str, amount_cents: int) -> None:
    """A stand-in for any step that can fail after the writes (here: a payment)."""
    if card == DECLINED_CARD:
        raise CardDeclinedError(f"card declined for {amount_cents} cents")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the connection pool for the app's lifetime; check pgoutbox's schema once."""
    # autocommit: a statement outside `conn.transaction()` commits by itself, and
    # `conn.transaction()` is one explicit transaction (as with pgoutbox.Pool).
    async with AsyncConnectionPool(
        DSN, min_size=1, max_size=10, kwargs={"autocommit": True}, open=False
    ) as pool:
        async with pool.connection() as conn:
            await queue.check_schema(conn)  # fail at start-up, not at the first order
        app.state.pool = pool
        yield
    await queue.aclose()  # the queue's own pool, if anything used it


app = FastAPI(title="pgoutbox FastAPI example", lifespan=lifespan)


async def connection(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection from the app's pool for one request."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = request.app.state.pool
    async with pool.connection() as conn:
        yield conn


DBConnection = Annotated[psycopg.AsyncConnection[Any], Depends(connection)]


@app.post("/orders", status_code=status.HTTP_201_CREATED)
async def place_order(new: NewOrder, conn: DBConnection) -> OrderPlaced:
    """Insert the order and enqueue its receipt: both commit, or neither exists."""
    try:
        async with conn.transaction():
            cur = conn.cursor(row_factory=scalar_row)
            await cur.execute(
                "INSERT INTO example_fastapi_orders (email, amount_cents) VALUES (%s, %s) "
                "RETURNING id",
                [new.email, new.amount_cents],
            )
            order_id: int | None = await cur.fetchone()
            if order_id is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            job = await queue.enqueue(conn, send_receipt, order_id, new.email)
            charge_card(new.card, new.amount_cents)  # raises: the order and the job roll back
    except CardDeclinedError as ex:
        raise HTTPException(status.HTTP_402_PAYMENT_REQUIRED, str(ex)) from None
    return OrderPlaced(id=order_id, receipt_job_id=job.id)


@app.get("/orders/{order_id}")
async def get_order(order_id: int, conn: DBConnection) -> Order:
    """The order, with the time its receipt was sent (null until the job ran)."""
    cur = conn.cursor(row_factory=class_row(Order))
    await cur.execute(
        "SELECT id, email, amount_cents, receipt_sent_at FROM example_fastapi_orders WHERE id = %s",
        [order_id],
    )
    order = await cur.fetchone()
    if order is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order {order_id}")
    return order
