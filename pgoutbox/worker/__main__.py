"""``python -m pgoutbox.worker package.module:queue``: run a worker until signalled."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from functools import partial

import anyio

from .._cli import (
    add_common_arguments,
    configure_logging,
    load_queue,
    pgoutbox_error_in,
    stop_on_signals,
)
from .._queue import DSN_ENV, Queue
from ..embedded import dsn_or_embedded
from ._worker import (
    DEFAULT_COMPLETED_RETENTION,
    DEFAULT_CONCURRENCY,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_VACUUM_THRESHOLD,
    Worker,
)


def build_parser(prog: str = "python -m pgoutbox.worker") -> argparse.ArgumentParser:
    """The worker command's arguments."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run pgoutbox jobs. The first SIGTERM/SIGINT stops fetching and lets "
        "running jobs finish; a second one stops at once.",
    )
    parser.add_argument("queue", help="the Queue to serve, as 'package.module:attribute'")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="jobs run at once (default: %(default)s)",
    )
    parser.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues to take jobs from (default: every queue of a registered task)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        help="seconds between fetches without a notification (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help="seconds running jobs get to finish after a stop signal (default: %(default)s)",
    )
    parser.add_argument(
        "--completed-retention",
        type=float,
        default=DEFAULT_COMPLETED_RETENTION,
        help="seconds completed jobs are kept; 0 deletes each as it completes, the fastest "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--vacuum-threshold",
        type=int,
        default=DEFAULT_VACUUM_THRESHOLD,
        help="dead rows in the jobs table at which maintenance vacuums it; 0 never "
        "(default: %(default)s)",
    )
    add_common_arguments(parser)
    return parser


async def serve(worker: Worker, *, migrate: bool = False) -> None:
    """Run `worker`, stopping it on SIGTERM/SIGINT; with `migrate`, migrate first."""
    try:
        if migrate:
            await worker.queue.migrate()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signals, worker.stop, tg.cancel_scope)
            await worker.run()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await worker.queue.aclose()  # the pool transactional handlers borrowed from


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    queue = load_queue(args.queue)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    try:
        worker = Worker(
            queue,
            concurrency=args.concurrency,
            queues=queues,
            poll_interval=args.poll_interval,
            shutdown_timeout=args.shutdown_timeout,
            completed_retention=args.completed_retention,
            vacuum_threshold=args.vacuum_threshold,
        )
        with contextlib.ExitStack() as stack:
            embedded = False
            if not _has_database(queue):
                dsn, embedded = stack.enter_context(dsn_or_embedded())
                print(  # noqa: T201 (CLI output)
                    f"pgoutbox: no {DSN_ENV} set, so an embedded PostgreSQL is running (it stops "
                    f"with the last process using it). Join it from another terminal with:\n"
                    f"  export {DSN_ENV}='{dsn}'",
                    file=sys.stderr,
                    flush=True,
                )
            anyio.run(partial(serve, worker, migrate=embedded), backend=args.backend)
    except BaseException as ex:
        error = pgoutbox_error_in(ex)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 (CLI output)
        return 2
    return 0


def _has_database(queue: Queue) -> bool:
    return queue._conninfo_if_any() is not None


if __name__ == "__main__":
    sys.exit(main())
