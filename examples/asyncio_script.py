"""pgoutbox in a plain asyncio program: stock psycopg, an in-process worker.

Run it with ``python examples/asyncio_script.py``. It uses ``$PGOUTBOX_DSN``, or the
local server at 127.0.0.1:5432 (user postgres, database test).

An upload writes its photo row and enqueues one thumbnail job per size in one
transaction (`Queue.enqueue_many`); a second upload fails after enqueueing, so
its row and its jobs roll back. A `pgoutbox.Worker` runs as an asyncio task
until the thumbnails are made, then stops.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

import psycopg
from psycopg.rows import scalar_row

import pgoutbox

DSN: Final = os.environ.get("PGOUTBOX_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SIZES: Final = (64, 256, 1024)

queue = pgoutbox.Queue(DSN, schema="example_asyncio")
thumbnails_made: list[tuple[int, int]] = []


@queue.task(name="photos.make_thumbnail", queue="images")
async def make_thumbnail(photo_id: int, width: int) -> None:
    await asyncio.sleep(0.01)  # the resizing
    thumbnails_made.append((photo_id, width))
    print(f"  worker: photo {photo_id} thumbnail {width}px made")


async def upload(conn: psycopg.AsyncConnection[Any], name: str) -> list[pgoutbox.Job]:
    """The photo row and its thumbnail jobs commit together, or not at all."""
    async with conn.transaction():
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            "INSERT INTO example_asyncio_photos (name) VALUES (%s) RETURNING id", [name]
        )
        photo_id: int | None = await cur.fetchone()
        if photo_id is None:
            raise RuntimeError("INSERT ... RETURNING returned no row")
        jobs = await queue.enqueue_many(
            conn, [make_thumbnail.bind(photo_id, width) for width in SIZES]
        )
        if name.endswith(".exe"):
            raise ValueError(f"{name} is not a photo")  # after the enqueue: all rolls back
    print(f"producer: uploaded {name} as photo {photo_id}, jobs {[job.id for job in jobs]}")
    return jobs


async def wait_until_finished(jobs: list[pgoutbox.Job]) -> list[pgoutbox.JobRecord]:
    """Poll the jobs' rows until each has reached a final state (the database knows best)."""
    async with asyncio.timeout(15):
        while True:
            records = [await queue.get_job(job.id) for job in jobs]
            finished = [r for r in records if r is not None and r.finished_at is not None]
            if len(finished) == len(jobs):
                return finished
            await asyncio.sleep(0.05)


async def main() -> None:
    await queue.migrate()
    # A stock psycopg connection (asyncio only); pgoutbox.connect() also works on trio.
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS example_asyncio_photos (id serial PRIMARY KEY, name text)"
        )
        jobs = await upload(conn, "cat.jpg")
        try:
            await upload(conn, "virus.exe")
        except ValueError as ex:
            print(f"producer: {ex}: the upload rolled back with its jobs")

    worker = pgoutbox.Worker(queue, concurrency=4)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(worker.run())
        records = await wait_until_finished(jobs)
        worker.stop()  # stop fetching; running jobs finish; run() returns
    for record in records:
        print(f"job {record.id}: {record.state.value}")
    await queue.aclose()  # get_job borrowed connections from the queue's own pool
    print(f"done: {len(thumbnails_made)} thumbnails made, none for virus.exe")


if __name__ == "__main__":
    asyncio.run(main())
