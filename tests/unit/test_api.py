"""The public API: what is exported, and that every public symbol is documented."""

from __future__ import annotations

import inspect

import pgoutbox
import pgoutbox.errors
import pgoutbox.worker


def _isort_key(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions, each alphabetical (ruff's RUF022 order)."""
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_api_all_is_sorted_and_complete() -> None:
    for module in (pgoutbox, pgoutbox.errors, pgoutbox.worker):
        assert module.__all__ == sorted(module.__all__, key=_isort_key), module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_api_every_public_symbol_has_a_docstring() -> None:
    missing = []
    for name in pgoutbox.__all__:
        obj = getattr(pgoutbox, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or (
                    not callable(member) and not isinstance(member, property)
                ):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    assert missing == []


def test_api_errors_share_one_root() -> None:
    for name in pgoutbox.errors.__all__:
        assert issubclass(getattr(pgoutbox.errors, name), pgoutbox.PgoutboxError)
