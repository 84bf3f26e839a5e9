"""``python -m pgoutbox``: administrative commands (``migrate``, ``worker``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio
import psycopg

from ._cli import add_common_arguments, configure_logging, load_queue
from ._queue import DEFAULT_SCHEMA, Queue
from .errors import PgoutboxError
from .worker import __main__ as worker_cli


def build_parser() -> argparse.ArgumentParser:
    """The administrative command's arguments."""
    parser = argparse.ArgumentParser(prog="python -m pgoutbox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade pgoutbox's schema (safe to run from many processes)",
        description="Create or upgrade pgoutbox's schema. Give the application's queue, or "
        "a DSN and schema name.",
    )
    migrate.add_argument(
        "queue", nargs="?", help="the Queue, as 'package.module:attribute' (optional)"
    )
    migrate.add_argument("--dsn", help="connection string (default: the queue's, or $PGOUTBOX_DSN)")
    migrate.add_argument(
        "--schema",
        help=f"schema name (default: the queue's, or {DEFAULT_SCHEMA} when no queue is given)",
    )
    add_common_arguments(migrate)
    commands.add_parser(
        "worker", help="run a worker (same as python -m pgoutbox.worker)", add_help=False
    )
    return parser


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
        anyio.run(_migrate, queue, backend=args.backend)
    except (PgoutboxError, psycopg.OperationalError) as ex:
        print(f"error: {ex}", file=sys.stderr)  # noqa: T201 (CLI output)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
