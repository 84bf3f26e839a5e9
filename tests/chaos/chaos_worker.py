"""A chaos-test worker process: ``python -m tests.chaos.chaos_worker [--backend trio]``.

Run from the repository root with ``$PGOUTBOX_DSN`` and ``$PGOUTBOX_CHAOS_SCHEMA``
set. It serves `tests.chaos.chaos_app.queue` with the fast settings below
(the CLI does not expose the heartbeat options) and stops like
``python -m pgoutbox.worker``: the first SIGTERM/SIGINT drains, a second one
stops at once. On Linux it dies with the test process that started it
(``PR_SET_PDEATHSIG``), so a killed test never leaves workers behind.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

import anyio

import pgoutbox
from pgoutbox.worker.__main__ import serve

from .chaos_app import CONCURRENCY, queue

PARENT_ENV: Final = "PGOUTBOX_CHAOS_PARENT"
"""The PID of the test process; the worker exits if that process is gone."""

SETTINGS: Final[dict[str, Any]] = {
    "concurrency": CONCURRENCY,
    "poll_interval": 0.2,
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.5,
    "maintenance_interval": 0.2,
    "probe_interval": 1.0,
    "shutdown_timeout": 5.0,
    "vacuum_threshold": 200,
}
"""Worker options: every loop fast, so faults are noticed and repaired in about a second, and
the jobs table vacuumed every few seconds, so that faults also hit vacuums."""

LOG_FORMAT: Final = "%(asctime)s %(process)d %(levelname)s %(name)s [%(event)s] %(message)s"

_PR_SET_PDEATHSIG: Final = 1


class _EventField(logging.Filter):
    """Give every record an ``event`` attribute (pgoutbox's structured event name, or '-')."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "event"):
            record.event = "-"
        return True


def _die_with_parent() -> None:
    """SIGKILL this process when the test process ends (Linux); exit if it already did."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != int(parent):
        raise SystemExit("the chaos test process is gone")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until signalled; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.chaos_worker")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args(argv)
    _die_with_parent()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_EventField())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("pgoutbox").setLevel(logging.INFO)
    worker = pgoutbox.Worker(queue, **SETTINGS)
    logging.getLogger("pgoutbox.worker").info(
        "chaos worker %s on %s", worker.id, args.backend, extra={"event": "chaos.worker"}
    )
    anyio.run(serve, worker, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
