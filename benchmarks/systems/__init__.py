"""The systems the suite compares, behind one small async interface.

Each system lives in its own module and exposes a `System` subclass:

- ``setup(dsn)``: install the system's schema in a fresh database;
- ``producer()``: a producer on its own connection, with ``enqueue_one(i)``
  (one job, one transaction) and ``enqueue_batch(ids)`` (many jobs, one
  transaction, the system's bulk API);
- ``enqueue_bulk(n)``: pre-load ``n`` jobs (untimed);
- ``start_workers(k)``: ``k`` real worker processes (``benchmarks/worker.py``),
  each running the system's own worker the way its docs recommend for
  throughput, with a no-op handler that reports to a `Probe`;
- ``wait_drained()``: until no job is left unfinished;
- ``teardown()``.

The handler of every system does one thing: ``probe.hit(i)``, where ``i`` is
the job's payload. The probe bumps this process's counter in a shared memory
file (drain throughput) and, when asked, sends ``(i, perf_counter())`` to the
suite over UDP (latency). `time.perf_counter` is CLOCK_MONOTONIC on Linux, so
timestamps from worker processes compare with the suite's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import mmap
import os
import socket
import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc
import psycopg
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = [
    "NAMES",
    "TASK_NAME",
    "Counters",
    "Probe",
    "ProbeSpec",
    "Producer",
    "StartTimes",
    "System",
    "WorkerGroup",
    "load",
]

TASK_NAME: Final = "bench_noop"
"""The task / entrypoint name every system registers its no-op handler under."""

PRELOAD_CHUNK: Final = 10_000
"""Jobs per transaction when pre-loading a backlog (untimed)."""

WORKER_SCRIPT: Final = Path(__file__).resolve().parent.parent / "worker.py"

READY_TIMEOUT: Final = 60.0
"""Seconds a worker process may take to import its system and say it is ready."""

STOP_TIMEOUT: Final = 30.0
"""Seconds a worker process may take to stop gracefully before it is killed."""

_COUNTER = struct.Struct("<q")
_log_numbers = itertools.count()
_REPORT = struct.Struct("<qd")
_TIME = struct.Struct("<d")

NAMES: Final = (
    "pgoutbox",
    "yardstick",
    "pgqueuer-asyncpg",
    "pgqueuer-psycopg",
    "procrastinate",
)
"""Every system, in the order the tables list them."""


def load(name: str) -> System:
    """A fresh adapter for the system called `name` (imports its module lazily).

    Raises:
        ImportError: the system's library is not installed.
        KeyError: unknown name.
    """
    modules: dict[str, tuple[str, Callable[[Any], System]]] = {
        "pgoutbox": ("systems.pgoutbox_system", lambda m: m.PgoutboxSystem()),
        "yardstick": ("systems.yardstick", lambda m: m.YardstickSystem()),
        "pgqueuer-asyncpg": ("systems.pgqueuer_system", lambda m: m.PgqueuerSystem("asyncpg")),
        "pgqueuer-psycopg": ("systems.pgqueuer_system", lambda m: m.PgqueuerSystem("psycopg")),
        "procrastinate": ("systems.procrastinate_system", lambda m: m.ProcrastinateSystem()),
    }
    module_name, make = modules[name]
    return make(importlib.import_module(module_name))


# -- the probe: what the handlers report to ------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """Where a worker process reports.

    Attributes:
        counters_path: the shared file of per-process handler-call counters.
        slot: this process's counter in it.
        times_path: for latencies, a shared file of one start time per job
            index (offset by `TIMES_BASE`); empty for none.
        udp_port: for latencies, where to send a wake-up datagram per start.
    """

    counters_path: str
    slot: int
    times_path: str = ""
    udp_port: int | None = None

    def to_arg(self) -> str:
        """Encode for a command line."""
        return f"{self.counters_path}|{self.slot}|{self.times_path}|{self.udp_port or 0}"

    @classmethod
    def from_arg(cls, text: str) -> ProbeSpec:
        """Decode `to_arg`."""
        path, slot, times, port = text.rsplit("|", 3)
        return cls(path, int(slot), times, int(port) or None)


TIMES_BASE: Final = 1000
"""Job indexes from -TIMES_BASE up have a start-time slot (warm-up jobs are negative)."""


class Probe:
    """Called first thing in every no-op handler (worker-process side)."""

    def __init__(self, spec: ProbeSpec) -> None:
        with open(spec.counters_path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), 0)
        self._offset = spec.slot * _COUNTER.size
        self._count = 0
        self._times: mmap.mmap | None = None
        if spec.times_path:
            with open(spec.times_path, "r+b") as f:
                self._times = mmap.mmap(f.fileno(), 0)
        self._sock: socket.socket | None = None
        self._addr = ("127.0.0.1", spec.udp_port or 0)
        if spec.udp_port:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def hit(self, i: int) -> None:
        """Count one handler call; record its start time when latencies are wanted."""
        now = perf_counter()
        self._count += 1
        _COUNTER.pack_into(self._mm, self._offset, self._count)
        if self._times is not None:
            _TIME.pack_into(self._times, (i + TIMES_BASE) * _TIME.size, now)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendto(_REPORT.pack(i, now), self._addr)

    def close(self) -> None:
        """Release the shared memory and the socket."""
        self._mm.close()
        if self._times is not None:
            self._times.close()
        if self._sock is not None:
            self._sock.close()


class StartTimes:
    """The suite's view of the handler start times (lossless, unlike the UDP wake-ups)."""

    def __init__(self, directory: str, jobs: int) -> None:
        fd, self.path = _mkstemp(directory)
        with os.fdopen(fd, "r+b") as f:
            f.truncate((jobs + TIMES_BASE) * _TIME.size)
            self._mm = mmap.mmap(f.fileno(), 0)

    def get(self, i: int) -> float | None:
        """When job `i`'s handler started, or None if it has not."""
        value: float = _TIME.unpack_from(self._mm, (i + TIMES_BASE) * _TIME.size)[0]
        return value or None

    def close(self) -> None:
        """Unmap and delete the file."""
        self._mm.close()
        Path(self.path).unlink(missing_ok=True)


class Counters:
    """The suite's view of the worker processes' handler-call counters."""

    def __init__(self, directory: str, slots: int) -> None:
        fd, self.path = _mkstemp(directory)
        with os.fdopen(fd, "r+b") as f:
            f.write(b"\0" * _COUNTER.size * slots)
            f.flush()
            self._mm = mmap.mmap(f.fileno(), 0)
        self.slots = slots

    def total(self) -> int:
        """Handler calls so far, over every worker process."""
        return sum(
            _COUNTER.unpack_from(self._mm, slot * _COUNTER.size)[0] for slot in range(self.slots)
        )

    def close(self) -> None:
        """Unmap and delete the file."""
        self._mm.close()
        Path(self.path).unlink(missing_ok=True)


def _mkstemp(directory: str) -> tuple[int, str]:
    import tempfile  # noqa: PLC0415 (only the suite side needs it)

    return tempfile.mkstemp(prefix="counters-", dir=directory)


def decode_report(data: bytes) -> tuple[int, float]:
    """A latency report from `Probe.hit`: (job index, handler start time)."""
    i, t = _REPORT.unpack(data)
    return int(i), float(t)


# -- worker processes ----------------------------------------------------------


class WorkerGroup:
    """Running worker processes of one system (suite side)."""

    def __init__(self, processes: list[anyio.abc.Process], logs: list[Path]) -> None:
        self.processes = processes
        self.logs = logs
        self.started_at = 0.0

    async def go(self) -> float:
        """Tell every process to start its worker; return the time it was told."""
        self.started_at = perf_counter()
        for proc in self.processes:
            assert proc.stdin is not None  # noqa: S101 (opened with a pipe)
            await proc.stdin.send(b"go\n")
        return self.started_at

    def check_alive(self) -> None:
        """Raise if a worker process has exited on its own."""
        for proc in self.processes:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"worker process exited with {proc.returncode}:\n{self.log_tail()}"
                )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the worker processes' stderr."""
        return "\n".join(
            log.read_text(errors="replace")[-chars:] for log in self.logs if log.exists()
        )

    async def stop(self) -> None:
        """Ask every process to stop gracefully; kill what has not exited in time."""
        for proc in self.processes:
            if proc.returncode is None and proc.stdin is not None:
                try:
                    await proc.stdin.send(b"stop\n")
                    await proc.stdin.aclose()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
        with anyio.move_on_after(STOP_TIMEOUT, shield=True):
            for proc in self.processes:
                await proc.wait()
        for proc in self.processes:
            if proc.returncode is None:
                proc.kill()
                with anyio.CancelScope(shield=True):
                    await proc.wait()


@asynccontextmanager
async def _worker_processes(
    system: str,
    dsn: str,
    specs: Sequence[ProbeSpec],
    *,
    log_dir: str,
    options: dict[str, str],
    profile_dir: str | None,
) -> AsyncIterator[WorkerGroup]:
    """Start one worker process per spec, wait until each has imported its system.

    With `profile_dir`, each runs under ``py-spy record`` (raw collapsed stacks).
    """
    processes: list[anyio.abc.Process] = []
    logs: list[Path] = []
    group = WorkerGroup(processes, logs)
    try:
        for n, spec in enumerate(specs):
            log = Path(log_dir) / f"worker-{next(_log_numbers):03d}-{system}-{n}.log"
            logs.append(log)
            cmd = [
                sys.executable,
                str(WORKER_SCRIPT),
                system,
                "--dsn",
                dsn,
                "--probe",
                spec.to_arg(),
            ]
            for key, value in options.items():
                cmd += [f"--{key}", value]
            if profile_dir:
                Path(profile_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (start-up)
                out = Path(profile_dir) / f"{log.stem}.txt"
                beside = Path(sys.executable).with_name("py-spy")
                py_spy = str(beside) if beside.exists() else "py-spy"
                cmd = [py_spy, "record", "--idle", "-f", "raw", "-o", str(out), "--", *cmd]
            with open(log, "wb") as stderr:  # noqa: ASYNC230 (a local file, at start-up)
                proc = await anyio.open_process(cmd, stderr=stderr, start_new_session=True)
            processes.append(proc)
        with anyio.fail_after(READY_TIMEOUT):
            for proc in processes:
                assert proc.stdout is not None  # noqa: S101
                stdout = BufferedByteReceiveStream(proc.stdout)
                try:
                    # Skip what a wrapper (py-spy) prints before the worker's "ready".
                    while await stdout.receive_until(b"\n", 4096) != b"ready":
                        pass
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    await proc.wait()
                    group.check_alive()
                    raise
        yield group
    finally:
        with anyio.CancelScope(shield=True):
            await group.stop()


# -- the interface -------------------------------------------------------------


class Producer(ABC):
    """Enqueues jobs on one connection of its own (suite side)."""

    @abstractmethod
    async def enqueue_one(self, i: int) -> None:
        """Enqueue job `i` in a transaction of its own."""

    @abstractmethod
    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        """Enqueue one job per id in one transaction, with the system's bulk API."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


class System(ABC):
    """One queue implementation under test, bound to one database after `setup`."""

    name: str = ""
    worker_loop: str = "asyncio"
    """The event loop its worker processes run on ("asyncio" or "uvloop")."""

    bulk_note: str = ""
    """How `Producer.enqueue_batch` writes, when that is worth a footnote."""

    def __init__(self) -> None:
        self.dsn = ""
        self.notify = True

    @property
    @abstractmethod
    def config(self) -> str:
        """How its worker is driven, for the settings line."""

    @abstractmethod
    async def install(self) -> None:
        """Create the system's schema in ``self.dsn``."""

    async def disable_notify(self) -> None:
        """Make enqueue skip its NOTIFY (for the NOTIFY on/off comparison)."""
        self.notify = False

    @abstractmethod
    async def open_producer(self) -> Producer:
        """A producer on a connection of its own."""

    @abstractmethod
    async def remaining(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Jobs enqueued but not yet finished (acknowledged)."""

    @abstractmethod
    async def run_worker(self, probe: Probe, stop: asyncio.Event, options: dict[str, str]) -> None:
        """Run the system's worker in this (worker) process until `stop` is set.

        Called in the worker process on its event loop, after ``self.dsn`` is set.
        """

    def worker_options(self) -> dict[str, str]:
        """Options passed to `run_worker` in each worker process."""
        return {}

    # -- shared implementation ----------------------------------------------

    async def setup(self, dsn: str, *, notify: bool = True) -> None:
        """Install the schema in the fresh database `dsn`."""
        self.dsn = dsn
        await self.install()
        if not notify:
            await self.disable_notify()

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[Producer]:
        """`open_producer` as a context manager."""
        async with await self.open_producer() as producer:
            yield producer

    async def enqueue_bulk(self, n: int, *, start: int = 0) -> None:
        """Pre-load `n` jobs (untimed), in chunks of `PRELOAD_CHUNK` per transaction."""
        async with self.producer() as producer:
            for lo in range(start, start + n, PRELOAD_CHUNK):
                await producer.enqueue_batch(range(lo, min(lo + PRELOAD_CHUNK, start + n)))

    @asynccontextmanager
    async def start_workers(
        self, specs: Sequence[ProbeSpec], *, log_dir: str, profile_dir: str | None = None
    ) -> AsyncIterator[WorkerGroup]:
        """One real worker process per probe spec; stopped (gracefully) on exit."""
        async with _worker_processes(
            self.name,
            self.dsn,
            specs,
            log_dir=log_dir,
            options=self.worker_options(),
            profile_dir=profile_dir,
        ) as group:
            yield group

    async def wait_drained(self, *, timeout: float, interval: float = 0.01) -> float:  # noqa: ASYNC109
        """Poll until no job is left unfinished; return the time that was seen.

        Raises:
            TimeoutError: jobs were left after `timeout` seconds.
        """
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            with anyio.fail_after(timeout):
                while await self.remaining(conn):  # noqa: ASYNC110 (polling the database)
                    await anyio.sleep(interval)
        return perf_counter()

    async def teardown(self) -> None:  # noqa: B027 (optional hook)
        """Release what `setup` acquired in the suite process (nothing by default)."""
