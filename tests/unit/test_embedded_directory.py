"""The embedded server's default directories, whose names anyone could take first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgoutbox import ConfigurationError, embedded


def test_a_new_directory_is_made_for_this_user_alone(tmp_path: Path) -> None:
    made = tmp_path / "runtime"
    embedded._private_directory(made)
    assert made.stat().st_mode & 0o777 == 0o700
    embedded._private_directory(made)  # the same user may use it again


def test_a_directory_another_user_made_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: taken.stat().st_uid + 4242)
    with pytest.raises(ConfigurationError, match="not this user's own directory"):
        embedded._private_directory(taken)


def test_a_directory_anyone_may_write_to_or_a_link_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigurationError, match="PGOUTBOX_EMBEDDED_DIR"):
        embedded._private_directory(shared)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigurationError, match="not this user's own directory"):
        embedded._private_directory(link)
