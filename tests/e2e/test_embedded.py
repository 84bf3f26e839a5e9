"""Zero setup: with no DSN, the worker and the quickstart start an embedded PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

import pgoutbox

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0
EXAMPLES = Path(__file__).parent.parent.parent / "examples"

APP = textwrap.dedent(
    """
    import pgoutbox

    queue = pgoutbox.Queue(schema="zero_setup")


    @queue.task(name="zero.hello")
    async def hello(name: str) -> None:
        async with await pgoutbox.connect(queue.conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify('zero_done', %s)", [name])
    """
)


@pytest.fixture
def embedded_env() -> Iterator[dict[str, str]]:
    """An environment with no DSN and a private embedded data directory (under /tmp)."""
    directory = Path(tempfile.mkdtemp(prefix="pgoutbox-e2e-embedded-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "PGOUTBOX_DSN"}
    env["PGOUTBOX_EMBEDDED_DIR"] = str(directory / "pgdata")
    env["PYTHONUNBUFFERED"] = "1"
    try:
        yield env
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _postmaster_running(data: Path) -> bool:
    return (data / "postmaster.pid").exists()


def test_embedded_worker_prints_dsn_that_a_producer_can_join(
    tmp_path: Path, embedded_env: dict[str, str]
) -> None:
    (tmp_path / "zero_app.py").write_text(APP)
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgoutbox.worker", "zero_app:queue"],
        cwd=tmp_path,
        env=embedded_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        dsn = ""
        for line in worker.stderr:
            if line.strip().startswith("export PGOUTBOX_DSN="):
                dsn = line.strip().split("=", 1)[1].strip("'")
            if "worker started" in line:
                break
        assert dsn.startswith("postgresql://")
        with psycopg.connect(dsn, autocommit=True) as listener:
            listener.execute("LISTEN zero_done")

            async def produce() -> None:
                queue = pgoutbox.Queue(dsn, schema="zero_setup")
                async with await pgoutbox.connect(dsn) as conn, conn.transaction():
                    await queue.enqueue(conn, "zero.hello", name="ada")

            anyio.run(produce)
            got = [n.payload for n in listener.notifies(timeout=TIMEOUT, stop_after=1)]
        assert got == ["ada"]
        worker.send_signal(signal.SIGTERM)
        _, errors = worker.communicate(timeout=TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, errors
    assert not _postmaster_running(Path(embedded_env["PGOUTBOX_EMBEDDED_DIR"]))


def test_embedded_quickstart_runs_with_no_dsn(embedded_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        env=embedded_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "using an embedded PostgreSQL" in result.stdout
    assert "done: 2 emails sent" in result.stdout
    assert not _postmaster_running(Path(embedded_env["PGOUTBOX_EMBEDDED_DIR"]))
