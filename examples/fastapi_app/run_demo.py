"""Run the FastAPI example end to end, and stop everything again.

From the repository root: ``python -m examples.fastapi_app.run_demo``. It uses
``$PGOUTBOX_DSN``, or the local server at 127.0.0.1:5432 (user postgres, database test).

1. Migrates pgoutbox's schema and creates the orders table (a deploy step).
2. Starts ``python -m pgoutbox.worker examples.fastapi_app.tasks:queue`` as a
   separate process.
3. Serves the app with uvicorn on 127.0.0.1 (a free port) and talks to it over
   HTTP: one order is placed; one is declined, so neither it nor its job exists.
4. Waits until the worker has marked the receipt as sent, then stops the
   server and sends SIGTERM to the worker, which finishes and exits with 0.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import httpx
import psycopg
import uvicorn
from psycopg import sql

from . import tasks
from .app import CREATE_TABLES, DECLINED_CARD, app

ROOT: Final = Path(__file__).resolve().parents[2]
"""The directory holding ``examples/``: the worker imports the tasks module from there."""

WORKER: Final = [sys.executable, "-m", "pgoutbox.worker", f"{tasks.__name__}:queue"]

RECEIPT_TIMEOUT: Final = 15.0
"""Seconds the demo waits for the worker to send the receipt."""


async def set_up() -> None:
    """What a deployment does before starting the app and the workers."""
    applied = await tasks.queue.migrate()
    print(f"setup: pgoutbox schema {tasks.queue.schema!r}, migrations applied now: {applied}")
    async with await psycopg.AsyncConnection.connect(tasks.DSN, autocommit=True) as conn:
        await conn.execute(CREATE_TABLES)


async def jobs_for(email: str) -> int:
    """How many receipt jobs exist for `email` (reads pgoutbox's jobs table)."""
    async with await psycopg.AsyncConnection.connect(tasks.DSN) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.jobs WHERE task = %s AND args->>'email' = %s").format(
                sql.Identifier(tasks.queue.schema)
            ),
            [tasks.send_receipt.name, email],
        )
        row = await cur.fetchone()
        return 0 if row is None else int(row[0])


async def use_the_api(base_url: str) -> None:
    """What a client does: place orders, then watch the receipt get sent."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        order = {"email": "ada@example.com", "amount_cents": 1999, "card": "4242424242424242"}
        response = await client.post("/orders", json=order)
        response.raise_for_status()
        placed = response.json()
        order_id = placed["id"]
        print(
            f"client: POST /orders -> {response.status_code}, order {order_id}, "
            f"receipt job {placed['receipt_job_id']}"
        )

        declined = {"email": "mallory@example.com", "amount_cents": 500, "card": DECLINED_CARD}
        response = await client.post("/orders", json=declined)
        print(
            f"client: POST /orders with a declined card -> {response.status_code}; "
            f"receipt jobs for mallory@example.com: {await jobs_for('mallory@example.com')}"
        )

        with anyio.fail_after(RECEIPT_TIMEOUT):
            while True:
                response = await client.get(f"/orders/{order_id}")
                response.raise_for_status()
                sent_at = response.json()["receipt_sent_at"]
                if sent_at is not None:
                    break
                await anyio.sleep(0.05)
        print(f"client: GET /orders/{order_id} -> receipt sent at {sent_at}")


async def serve_and_use(sock: socket.socket) -> None:
    """Serve the app on `sock` with uvicorn, in this process, while the client runs."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    host, port = sock.getsockname()[:2]
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            with anyio.fail_after(10):
                while not server.started:  # uvicorn has no start-up event to wait for
                    if server.should_exit:
                        raise RuntimeError("the app failed to start (see the log above)")
                    await anyio.sleep(0.01)
            print(f"demo: app serving on http://{host}:{port}")
            await use_the_api(f"http://{host}:{port}")
        finally:
            server.should_exit = True  # graceful: runs the lifespan's exit (closes the pool)


async def watch_worker(worker: anyio.abc.Process) -> None:
    """Fail the demo at once if the worker exits before it is told to."""
    status = await worker.wait()
    raise RuntimeError(f"the worker exited early with status {status} (see its log above)")


async def stop_worker(worker: anyio.abc.Process) -> int:
    """SIGTERM: the worker stops fetching, lets running jobs finish, and exits."""
    if worker.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            worker.terminate()
    with anyio.move_on_after(10, shield=True):
        return await worker.wait()
    worker.kill()
    await worker.wait()
    raise RuntimeError(f"the worker (pid {worker.pid}) ignored SIGTERM; killed it")


async def main() -> int:
    await set_up()
    worker = await anyio.open_process(
        WORKER, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=None, stderr=None
    )
    print(f"demo: worker process {worker.pid} started: {' '.join(WORKER[1:])}")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_worker, worker)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))  # a free port, held until the server takes it
                await serve_and_use(sock)
            tg.cancel_scope.cancel()
        print("demo: app stopped")
    finally:
        status = await stop_worker(worker)
    print(f"demo: worker stopped by SIGTERM, exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(anyio.run(main))
