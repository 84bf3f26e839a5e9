"""How the worker hands jobs to executors (`Feed`) and counts free slots (`Slots`),
without a database."""

from __future__ import annotations

import anyio
import msgspec
import pytest

import pgoutbox
from pgoutbox._job import ClaimedJob
from pgoutbox.worker._producer import Feed, Slots

pytestmark = pytest.mark.anyio

WAIT = 5.0
"""Seconds a test waits for something that should happen at once."""


def job(job_id: int) -> ClaimedJob:
    return ClaimedJob(
        id=job_id,
        queue="q",
        task="t",
        args="{}",
        priority=0,
        attempt=1,
        max_attempts=3,
    )


async def test_jobs_that_never_wait_run_back_to_back_in_one_executor() -> None:
    feed = Feed()
    ran: list[tuple[int, int]] = []  # (executor, job id)

    async def executor(number: int) -> None:
        while True:
            ran.append((number, (await feed.get()).id))

    async with anyio.create_task_group() as tg:
        for number in range(4):
            tg.start_soon(executor, number)
        await anyio.wait_all_tasks_blocked()
        for job_id in range(1, 6):
            feed.put(job(job_id))
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert [job_id for _, job_id in ran] == [1, 2, 3, 4, 5]
    # The first executor woke the next one, which found nothing left to do.
    assert len({number for number, _ in ran}) == 1


async def test_a_job_that_waits_lets_the_next_executor_start_the_next_job() -> None:
    feed = Feed()
    release = anyio.Event()
    started: list[int] = []

    async def executor() -> None:
        while True:
            claimed = await feed.get()
            started.append(claimed.id)
            await release.wait()  # every job waits on something

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(executor)
        await anyio.wait_all_tasks_blocked()
        for job_id in (1, 2, 3):
            feed.put(job(job_id))
        with anyio.fail_after(WAIT):
            while len(started) < 3:
                await anyio.wait_all_tasks_blocked()
        assert sorted(started) == [1, 2, 3]  # all three run at once
        tg.cancel_scope.cancel()


async def test_a_job_put_while_every_executor_is_busy_waits_for_the_first_free_one() -> None:
    feed = Feed()
    gate = anyio.Event()
    finished: list[int] = []

    async def executor() -> None:
        while True:
            claimed = await feed.get()
            if claimed.id == 1:
                await gate.wait()
            finished.append(claimed.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(executor)
        await anyio.wait_all_tasks_blocked()
        feed.put(job(1))
        await anyio.wait_all_tasks_blocked()
        feed.put(job(2))  # the only executor is busy with job 1
        await anyio.wait_all_tasks_blocked()
        assert finished == []
        gate.set()
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert finished == [1, 2]


async def test_slots_wake_the_waiter_only_once_enough_are_free() -> None:
    slots = Slots(4)
    for _ in range(4):
        slots.take()
    woke: list[int] = []

    async def waiter() -> None:
        await slots.wait_free(3)
        woke.append(slots.free)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        slots.release()
        slots.release()
        assert not waking(slots)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        slots.release()
        assert waking(slots)  # executors yield to the producer while this is set
        await anyio.wait_all_tasks_blocked()
    assert woke == [3]
    assert not waking(slots)


def waking(slots: Slots) -> bool:
    """`slots.waking` read afresh (mypy would otherwise narrow it across awaits)."""
    return slots.waking


def test_only_the_newest_run_of_a_job_reports_its_outcome() -> None:
    """Two runs of one attempt (a claim lost to a crash, then claimed again here): the
    older run's outcome must not reach the completer, whatever batch it would share."""
    queue = pgoutbox.Queue("host=unused")

    @queue.task(name="t")
    async def t() -> None: ...

    worker = pgoutbox.Worker(queue)
    older = msgspec.structs.replace(job(5), claim_id="claim-a")
    newer = msgspec.structs.replace(job(5), claim_id="claim-b")
    worker._newest_claim[5] = newer.claim_id
    assert worker._is_newest(newer)
    assert not worker._is_newest(older)
    del worker._newest_claim[5]  # the newer run ended first
    assert not worker._is_newest(older)
