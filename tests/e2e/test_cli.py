"""The command-line tools in subprocesses: migrate, then a worker that drains on SIGTERM."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg import sql

import pgoutbox

pytestmark = pytest.mark.e2e

TIMEOUT = 30.0

APP = textwrap.dedent(
    """
    import anyio
    import pgoutbox

    queue = pgoutbox.Queue(schema={schema!r})


    async def tell(message: str) -> None:
        async with await pgoutbox.connect(queue.conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", [{channel!r}, message])


    @queue.task(name="e2e.record")
    async def record(n: int) -> None:
        await tell(f"record:{{n}}")


    @queue.task(name="e2e.slow")
    async def slow(seconds: float) -> None:
        await tell("slow:started")
        await anyio.sleep(seconds)
        await tell("slow:done")
    """
)


@pytest.fixture
def app(tmp_path: Path, database_dsn: str) -> Iterator[tuple[Path, str, str]]:
    schema = f"e2e_{secrets.token_hex(4)}"
    channel = f"e2e_events_{secrets.token_hex(4)}"
    (tmp_path / "e2e_app.py").write_text(APP.format(schema=schema, channel=channel))
    try:
        yield tmp_path, schema, channel
    finally:
        with psycopg.connect(database_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _env(database_dsn: str) -> dict[str, str]:
    return {**os.environ, "PGOUTBOX_DSN": database_dsn, "PYTHONUNBUFFERED": "1"}


def _wait_for(listener: psycopg.Connection[tuple[object, ...]], wanted: set[str]) -> None:
    """Consume notifications until all of `wanted` arrived (fails after TIMEOUT)."""
    missing = set(wanted)
    for notify in listener.notifies(timeout=TIMEOUT):
        missing.discard(notify.payload)
        if not missing:
            return
    pytest.fail(f"notifications never arrived: {sorted(missing)}")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cli_worker_processes_jobs_and_drains_on_sigterm(
    app: tuple[Path, str, str], database_dsn: str, backend: str
) -> None:
    cwd, schema, channel = app
    env = _env(database_dsn)
    migrate = subprocess.run(
        [sys.executable, "-m", "pgoutbox", "migrate", "e2e_app:queue"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    assert "applied migrations [1, " in migrate.stdout

    with psycopg.connect(database_dsn, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "pgoutbox.worker", "e2e_app:queue",
                "--concurrency", "4", "--backend", backend, "--shutdown-timeout", "20",
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            # This process never imports e2e_app: it enqueues by task name.
            for n in range(5):
                _enqueue_by_name(database_dsn, schema, "e2e.record", n=n)
            _wait_for(listener, {f"record:{n}" for n in range(5)})

            _enqueue_by_name(database_dsn, schema, "e2e.slow", seconds=1.0)
            _wait_for(listener, {"slow:started"})
            worker.send_signal(signal.SIGTERM)
            _wait_for(listener, {"slow:done"})
            output, _ = worker.communicate(timeout=TIMEOUT)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert worker.returncode == 0, output
    assert "worker started" in output
    assert "SIGTERM received" in output
    assert "worker stopped" in output
    with psycopg.connect(database_dsn) as conn:
        states = conn.execute(
            sql.SQL("SELECT state::text, count(*) FROM {}.jobs GROUP BY 1").format(
                sql.Identifier(schema)
            )
        ).fetchall()
        workers = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.workers").format(sql.Identifier(schema))
        ).fetchone()
    assert states == [("completed", 6)]
    assert workers == (0,)


def test_cli_second_signal_stops_at_once_and_returns_job(
    app: tuple[Path, str, str], database_dsn: str
) -> None:
    cwd, schema, channel = app
    env = _env(database_dsn)
    subprocess.run(
        [sys.executable, "-m", "pgoutbox", "migrate", "e2e_app:queue"],
        cwd=cwd, env=env, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    with psycopg.connect(database_dsn, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgoutbox.worker", "e2e_app:queue", "--shutdown-timeout", "600"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _enqueue_by_name(database_dsn, schema, "e2e.slow", seconds=600.0)
            _wait_for(listener, {"slow:started"})
            worker.send_signal(signal.SIGTERM)
            # Two signals sent back to back may be delivered as one: wait for the first.
            seen = _read_until(worker, "SIGTERM received")
            worker.send_signal(signal.SIGTERM)
            output, _ = worker.communicate(timeout=TIMEOUT)
            output = seen + output
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert worker.returncode == 0, output
    assert "stopping at once" in output
    with psycopg.connect(database_dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT state::text, worker_id FROM {}.jobs").format(sql.Identifier(schema))
        ).fetchone()
    assert row == ("available", None)


def _read_until(process: subprocess.Popen[str], text: str) -> str:
    """Read the process's output line by line until a line contains `text`.

    Bounded by the test timeout (pytest-timeout) should the line never come.
    """
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    pytest.fail(f"the process ended without printing {text!r}: {''.join(lines)}")


def _enqueue_by_name(database_dsn: str, schema: str, task: str, **kwargs: object) -> None:
    """Enqueue as a producer that never imported the handler's module."""

    async def enqueue() -> None:
        queue = pgoutbox.Queue(schema=schema)
        async with await pgoutbox.connect(database_dsn) as conn, conn.transaction():
            await queue.enqueue(conn, task, **kwargs)

    anyio.run(enqueue)


def test_cli_help_reads_well() -> None:
    for module in ("pgoutbox", "pgoutbox.worker"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
        assert "usage:" in result.stdout


def test_cli_worker_bad_queue_path_exits_with_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgoutbox.worker", "no_such_module:queue"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert "cannot import 'no_such_module'" in result.stderr


def _run_worker(cwd: Path, database_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgoutbox.worker e2e_app:queue ARGS`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "pgoutbox.worker", "e2e_app:queue", *args],
        cwd=cwd,
        env=_env(database_dsn),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_cli_worker_refuses_a_malformed_dsn_without_echoing_it(
    app: tuple[Path, str, str],
) -> None:
    cwd, _schema, _channel = app
    result = _run_worker(cwd, "host=127.0.0.1 password=S3cret PW")
    assert result.returncode == 2
    assert "not valid libpq syntax" in result.stderr
    assert "S3cret" not in result.stderr + result.stdout


def test_cli_worker_refuses_unmigrated_schema(
    app: tuple[Path, str, str], database_dsn: str
) -> None:
    cwd, _schema, _channel = app
    result = _run_worker(cwd, database_dsn)
    assert result.returncode == 2
    assert "not installed" in result.stderr
    assert "pgoutbox migrate" in result.stderr


def test_cli_worker_passes_vacuum_threshold_to_the_worker(
    app: tuple[Path, str, str], database_dsn: str
) -> None:
    cwd, _schema, _channel = app
    result = _run_worker(cwd, database_dsn, "--vacuum-threshold", "-1")
    assert result.returncode == 2
    assert "vacuum_threshold must be an integer >= 0, got -1" in result.stderr


def test_cli_status_prints_queues(app: tuple[Path, str, str], database_dsn: str) -> None:
    cwd, schema, _channel = app
    env = _env(database_dsn)
    subprocess.run(
        [sys.executable, "-m", "pgoutbox", "migrate", "e2e_app:queue"],
        cwd=cwd, env=env, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    _enqueue_by_name(database_dsn, schema, "e2e.record", n=1)
    result = subprocess.run(
        [sys.executable, "-m", "pgoutbox", "status", "e2e_app:queue"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[2].split()[:3] == ["queue", "scheduled", "available"]
    assert lines[3].split()[:3] == ["default", "0", "1"]
    assert "workers: 0" in result.stdout


def test_cli_migrate_as_a_role_without_the_privilege_exits_with_message(
    database_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pgoutbox.__main__ import main  # noqa: PLC0415 (the module runs the CLI)

    role = f"pgoutbox_test_{secrets.token_hex(6)}"
    with psycopg.connect(database_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        try:
            dsn = psycopg.conninfo.make_conninfo(database_dsn, user=role)
            assert main(["migrate", "--dsn", dsn, "--schema", "not_allowed"]) == 2
        finally:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert "permission denied" in error
