"""What the command-line entry points share: finding the queue, logging, signals."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Final

import anyio

from ._queue import Queue
from .errors import PgoutboxError

__all__ = [
    "add_common_arguments",
    "configure_logging",
    "load_queue",
    "pgoutbox_error_in",
    "stop_on_signals",
]

LOG_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def load_queue(path: str) -> Queue:
    """Import ``package.module:attribute`` and return the `Queue` it names."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise SystemExit(f"error: expected 'package.module:queue', got {path!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the working directory is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as ex:
        raise SystemExit(f"error: cannot import {module_name!r}: {ex}") from ex
    queue = getattr(module, attribute, None)
    if not isinstance(queue, Queue):
        raise SystemExit(f"error: {path!r} is not a pgoutbox.Queue (got {type(queue).__name__})")
    return queue


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes."""
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level for pgoutbox's loggers (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="asyncio",
        choices=["asyncio", "trio"],
        help="the anyio backend to run on (default: %(default)s)",
    )


def configure_logging(level: str) -> None:
    """Log to stderr; only the command-line entry points configure logging."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("pgoutbox").setLevel(level)


async def stop_on_signals(stop: Callable[[], None], hard: anyio.CancelScope) -> None:
    """First SIGINT/SIGTERM calls `stop()`; the second cancels `hard` at once."""
    log = logging.getLogger("pgoutbox.worker")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info(
                    "%s received: finishing running jobs (send it again to stop at once)",
                    signal.Signals(signum).name,
                    extra={"event": "worker.stopping"},
                )
                stop()
            else:
                log.warning("stopping at once", extra={"event": "worker.stopping_now"})
                hard.cancel()
                return


def pgoutbox_error_in(error: BaseException) -> PgoutboxError | None:
    """The `PgoutboxError` that `error` is or (in a task group's exception group) contains."""
    if isinstance(error, PgoutboxError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := pgoutbox_error_in(inner)) is not None:
                return found
    return None
