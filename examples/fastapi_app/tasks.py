"""The queue and its task: imported by the web app (to enqueue) and by the worker (to run).

The worker process runs ``python -m pgoutbox.worker examples.fastapi_app.tasks:queue``.
"""

from __future__ import annotations

import os

import pgoutbox

# Your settings: the web app's pool and the worker (which inherits the
# environment) both use it.
DSN = os.environ.get("PGOUTBOX_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")

queue = pgoutbox.Queue(DSN, schema="example_fastapi")


@queue.task(name="shop.send_receipt", queue="receipts")
async def send_receipt(order_id: int, email: str) -> None:
    """Send the order's receipt, then record that it was sent.

    The UPDATE runs in `current_job().transaction()`: it commits together with
    the job's completion, or not at all (and the job is retried).
    """
    print(f"worker (pid {os.getpid()}): receipt for order {order_id} sent to {email}", flush=True)
    async with pgoutbox.current_job().transaction() as conn:
        await conn.execute(
            "UPDATE example_fastapi_orders SET receipt_sent_at = now() WHERE id = %s",
            [order_id],
        )
