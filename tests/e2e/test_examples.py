"""Every example under examples/ runs and says what it promised."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent.parent
EXAMPLES = ROOT / "examples"


def test_example_quickstart_runs(database_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        env={**os.environ, "PGOUTBOX_DSN": database_dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "welcome email to ada@example.com" in result.stdout
    assert "welcome email to grace@example.com" in result.stdout
    assert "ghost@example.com (user" not in result.stdout
    assert "done: 2 emails sent" in result.stdout


def run_example(dsn: str, *args: str) -> str:
    """Run ``python *args`` from the repository root against `dsn`; return its stdout."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PGOUTBOX_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def test_example_fastapi_app_runs(database_dsn: str) -> None:
    out = run_example(database_dsn, "-m", "examples.fastapi_app.run_demo")
    started = re.search(r"demo: worker process (\d+) started", out)
    ran = re.search(r"worker \(pid (\d+)\): receipt for order (\d+) sent to ada@example\.com", out)
    assert started is not None, out
    assert ran is not None, out
    assert ran[1] == started[1], "the job ran in the worker process"
    assert int(ran[1]) != os.getpid()
    assert f"client: POST /orders -> 201, order {ran[2]}," in out
    assert (
        "client: POST /orders with a declined card -> 402; "
        "receipt jobs for mallory@example.com: 0" in out
    )
    assert re.search(rf"client: GET /orders/{ran[2]} -> receipt sent at \d{{4}}-", out), out
    assert "demo: worker stopped by SIGTERM, exit status 0" in out


@pytest.mark.parametrize("script", ["asyncio_script.py", "trio_script.py"])
def test_example_event_loop_script_runs(database_dsn: str, script: str) -> None:
    out = run_example(database_dsn, str(EXAMPLES / script))
    assert re.search(r"producer: uploaded cat\.jpg as photo \d+, jobs \[\d+, \d+, \d+\]", out)
    assert "producer: virus.exe is not a photo: the upload rolled back with its jobs" in out
    assert len(re.findall(r"worker: photo \d+ thumbnail \d+px made", out)) == 3
    assert len(re.findall(r"job \d+: completed", out)) == 3
    assert "done: 3 thumbnails made" in out


def test_example_sqlalchemy_recipe_runs(database_dsn: str) -> None:
    out = run_example(database_dsn, str(EXAMPLES / "sqlalchemy_recipe.py"))
    for mode in ("async", "sync"):
        assert re.search(rf"^{mode} commit: job \d+ available$", out, re.MULTILINE), out
        assert re.search(rf"^{mode} rollback: job \d+ does not exist$", out, re.MULTILINE), out
    assert "emailed to ada@example.com" in out
    assert "emailed to grace@example.com" in out
    assert "emailed to mallory" not in out
    assert "done: 2 invoices emailed" in out


def test_example_django_app_runs(database_dsn: str) -> None:
    out = run_example(database_dsn, "-m", "examples.django_app.run_demo")
    created = re.search(r"client: POST /signups -> 201, sign-up (\d+), welcome job \d+", out)
    assert created is not None, out
    assert (
        "client: POST /signups with a declined card -> 402; "
        "sign-ups for mallory@example.com: 0, welcome jobs: 0" in out
    )
    assert f"worker: welcome email to ada@example.com (sign-up {created[1]})" in out
    assert "welcome email to mallory" not in out
    assert re.search(rf"client: GET /signups/{created[1]} -> welcomed at \d{{4}}-", out), out
