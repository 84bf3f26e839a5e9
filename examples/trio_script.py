"""pgoutbox in a trio program: `pgoutbox.connect`, an in-process worker in a nursery.

Run it with ``python examples/trio_script.py``. It uses ``$PGOUTBOX_DSN``, or the
local server at 127.0.0.1:5432 (user postgres, database test).

The same program as ``asyncio_script.py``, under ``trio.run``. Stock
``psycopg.AsyncConnection`` runs on asyncio only; `pgoutbox.connect` (and
`pgoutbox.Pool`) give connections that work on trio too.
"""

from __future__ import annotations

import os
from typing import Any, Final

import trio
from psycopg.rows import scalar_row

import pgoutbox

DSN: Final = os.environ.get("PGOUTBOX_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SIZES: Final = (64, 256, 1024)

queue = pgoutbox.Queue(DSN, schema="example_trio")
thumbnails_made: list[tuple[int, int]] = []


@queue.task(name="photos.make_thumbnail", queue="images")
async def make_thumbnail(photo_id: int, width: int) -> None:
    await trio.sleep(0.01)  # the resizing
    thumbnails_made.append((photo_id, width))
    print(f"  worker: photo {photo_id} thumbnail {width}px made")


async def upload(conn: pgoutbox.Connection[Any], name: str) -> list[pgoutbox.Job]:
    """The photo row and its thumbnail jobs commit together, or not at all."""
    async with conn.transaction():
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("INSERT INTO example_trio_photos (name) VALUES (%s) RETURNING id", [name])
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
    with trio.fail_after(15):
        while True:
            records = [await queue.get_job(job.id) for job in jobs]
            finished = [r for r in records if r is not None and r.finished_at is not None]
            if len(finished) == len(jobs):
                return finished
            await trio.sleep(0.05)


async def main() -> None:
    await queue.migrate()
    async with await pgoutbox.connect(DSN, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS example_trio_photos (id serial PRIMARY KEY, name text)"
        )
        jobs = await upload(conn, "cat.jpg")
        try:
            await upload(conn, "virus.exe")
        except ValueError as ex:
            print(f"producer: {ex}: the upload rolled back with its jobs")

    worker = pgoutbox.Worker(queue, concurrency=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        records = await wait_until_finished(jobs)
        worker.stop()  # stop fetching; running jobs finish; run() returns
    for record in records:
        print(f"job {record.id}: {record.state.value}")
    await queue.aclose()  # get_job borrowed connections from the queue's own pool
    print(f"done: {len(thumbnails_made)} thumbnails made, none for virus.exe")


if __name__ == "__main__":
    trio.run(main)
