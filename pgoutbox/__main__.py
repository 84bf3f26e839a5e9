"""``python -m pgoutbox``: administrative commands (``migrate``, ``status``, ``worker``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import anyio
import msgspec
import psycopg

from ._cli import add_common_arguments, configure_logging, load_queue
from ._job import JobState, QueueStatus
from ._queue import DEFAULT_SCHEMA, Queue
from .errors import PgoutboxError
from .worker import __main__ as worker_cli


def build_parser() -> argparse.ArgumentParser:
    """The administrative command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m pgoutbox",
        description="Administer a pgoutbox installation: create or upgrade its schema, "
        "look at its queues and workers, or run a worker.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade pgoutbox's schema (safe to run from many processes)",
        description="Create or upgrade pgoutbox's schema. Give the application's queue, or "
        "a DSN and schema name.",
    )
    _add_target_arguments(migrate)
    add_common_arguments(migrate)
    status = commands.add_parser(
        "status",
        help="show jobs per queue and state, the oldest waiting job, and live workers",
        description="Show jobs per queue and state, how long the oldest due job has waited, "
        "and the registered workers with their heartbeats.",
    )
    _add_target_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_common_arguments(status)
    commands.add_parser(
        "worker", help="run a worker (same as python -m pgoutbox.worker)", add_help=False
    )
    return parser


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Which installation a command acts on: a queue, or a DSN and schema."""
    parser.add_argument(
        "queue", nargs="?", help="the Queue, as 'package.module:attribute' (optional)"
    )
    parser.add_argument("--dsn", help="connection string (default: the queue's, or $PGOUTBOX_DSN)")
    parser.add_argument(
        "--schema",
        help=f"schema name (default: the queue's, or {DEFAULT_SCHEMA} when no queue is given)",
    )


def _render_status(report: QueueStatus) -> str:
    states = list(JobState)
    header = ["queue", *(s.value for s in states), "oldest due"]
    rows = [
        [
            q.queue,
            *(str(q.counts.get(s, 0)) for s in states),
            "-" if q.oldest_due_age is None else f"{q.oldest_due_age:.1f} s",
        ]
        for q in report.queues
    ]
    lines = [_table(header, rows) if rows else "no jobs", ""]
    worker_rows = [
        [
            w.id[:8],
            w.hostname,
            str(w.pid),
            ",".join(w.queues),
            f"{w.running}/{w.concurrency}",
            f"{w.heartbeat_age:.1f} s ago",
        ]
        for w in report.workers
    ]
    lines.append(f"workers: {len(report.workers)}")
    if worker_rows:
        lines.append(_table(["id", "host", "pid", "queues", "running", "heartbeat"], worker_rows))
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


async def _status(queue: Queue, *, as_json: bool) -> None:
    report = await queue.status()
    if as_json:
        print(msgspec.json.encode(report).decode())  # noqa: T201 (CLI output)
    else:
        print(f"pgoutbox schema {queue.schema!r}\n")  # noqa: T201 (CLI output)
        print(_render_status(report))  # noqa: T201 (CLI output)


async def _migrate(queue: Queue) -> None:
    applied = await queue.migrate()
    done = f"applied migrations {applied}" if applied else "schema already up to date"
    print(f"pgoutbox schema {queue.schema!r}: {done}")  # noqa: T201 (CLI output)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.queue:
            app_queue = load_queue(args.queue)
            queue = Queue(args.dsn or app_queue.conninfo, schema=args.schema or app_queue.schema)
        else:
            queue = Queue(args.dsn, schema=args.schema or DEFAULT_SCHEMA)
        if args.command == "status":
            anyio.run(partial(_status, queue, as_json=args.json), backend=args.backend)
        else:
            anyio.run(_migrate, queue, backend=args.backend)
    except (PgoutboxError, psycopg.Error) as ex:
        print(f"error: {ex}", file=sys.stderr)  # noqa: T201 (CLI output)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
