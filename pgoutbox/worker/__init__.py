"""The worker: claims jobs, runs their handlers, records the outcomes.

Run it from code with ``await Worker(queue).run()`` or from a shell with
``python -m pgoutbox.worker package.module:queue``.
"""

from ._worker import (
    DEFAULT_COMPLETED_RETENTION,
    DEFAULT_CONCURRENCY,
    DEFAULT_FAILED_RETENTION,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAINTENANCE_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_VACUUM_THRESHOLD,
    Worker,
    WorkerStatistics,
)

__all__ = [
    "DEFAULT_COMPLETED_RETENTION",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_FAILED_RETENTION",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAINTENANCE_INTERVAL",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_VACUUM_THRESHOLD",
    "Worker",
    "WorkerStatistics",
]
