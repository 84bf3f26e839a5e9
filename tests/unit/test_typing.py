"""A type checker rejects wrong arguments for a task (ParamSpec through enqueue)."""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api

CHECKS = Path(__file__).parent.parent / "typing" / "enqueue_checks.py"


def test_typing_enqueue_arguments_are_checked_against_the_handler() -> None:
    stdout, _stderr, _status = api.run(
        ["--strict", "--no-incremental", "--show-error-codes", "--no-error-summary", str(CHECKS)]
    )
    found = {
        (int(m["line"]), m["code"])
        for m in re.finditer(r":(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$", stdout, re.M)
    }
    expected = {
        (number, m[1])
        for number, line in enumerate(CHECKS.read_text().splitlines(), start=1)
        if (m := re.search(r"# E: ([\w-]+)$", line))
    }
    assert expected, "the checks file marks no expected errors"
    assert found == expected, stdout
