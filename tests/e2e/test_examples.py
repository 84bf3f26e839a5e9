"""Every example under examples/ runs and says what it promised."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).parent.parent.parent / "examples"


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
