"""pgoutbox quickstart: enqueue inside your transaction, let a worker run the jobs.

Run it with ``python examples/quickstart.py``. It uses ``$PGOUTBOX_DSN``; with
none set it starts an embedded PostgreSQL (``pip install "pgoutbox[embedded]"``).
"""

from __future__ import annotations

import anyio
from psycopg.rows import scalar_row

import pgoutbox
from pgoutbox.embedded import dsn_or_embedded

queue = pgoutbox.Queue(schema="quickstart")  # the DSN comes from $PGOUTBOX_DSN
done = anyio.Event()
emails_sent: list[str] = []


@queue.task(queue="emails")
async def send_welcome(user_id: int, email: str) -> None:
    """The handler: its annotated parameters are the job's payload."""
    emails_sent.append(email)
    print(f"  worker: welcome email to {email} (user {user_id})")
    if len(emails_sent) == 2:
        done.set()


async def sign_up(conn: pgoutbox.Connection[tuple[object, ...]], email: str) -> None:
    """Your application code: the user row and the job commit together, or not at all."""
    async with conn.transaction():
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("INSERT INTO quickstart_users (email) VALUES (%s) RETURNING id", [email])
        user_id = await cur.fetchone()
        if user_id is None:
            raise RuntimeError("INSERT ... RETURNING returned no row")
        job = await queue.enqueue(conn, send_welcome, user_id, email)
        print(f"producer: signed up {email}, enqueued job {job.id}")


async def sign_up_then_fail(conn: pgoutbox.Connection[tuple[object, ...]], email: str) -> None:
    """A sign-up whose transaction fails after the enqueue: no user, no job, no email."""
    async with conn.transaction():
        await queue.enqueue(conn, send_welcome, 0, email)
        raise RuntimeError("payment failed")


async def main() -> None:
    await queue.migrate()
    async with await pgoutbox.connect(queue.conninfo, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS quickstart_users (id serial PRIMARY KEY, email text)"
        )
        worker = pgoutbox.Worker(queue, concurrency=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await sign_up(conn, "ada@example.com")
            try:
                await sign_up_then_fail(conn, "ghost@example.com")
            except RuntimeError:
                print("producer: a sign-up rolled back; its job never existed")
            await sign_up(conn, "grace@example.com")
            with anyio.fail_after(30):
                await done.wait()
            worker.stop()
    print(f"done: {len(emails_sent)} emails sent, none to ghost@example.com")


if __name__ == "__main__":
    with dsn_or_embedded() as (dsn, embedded):
        if embedded:
            print(f"(no PGOUTBOX_DSN set: using an embedded PostgreSQL at {dsn})")
        anyio.run(main)
