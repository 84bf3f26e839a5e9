"""The public API: what is exported, and that every public symbol is documented."""

from __future__ import annotations

import inspect

import pytest

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


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"queues": "emails"}, "list of queue names"),
        ({"poll_interval": float("nan")}, "poll_interval"),
        ({"shutdown_timeout": float("nan")}, "shutdown_timeout"),
        ({"shutdown_timeout": 0}, "shutdown_timeout"),
        ({"heartbeat_interval": "1"}, "heartbeat_interval"),
        ({"completed_retention": float("inf")}, "completed_retention"),
        ({"failed_retention": -1}, "failed_retention"),
        # Past a century the rescue's interval overflows in every worker's maintenance.
        ({"heartbeat_timeout": float("inf")}, "heartbeat_timeout"),
        ({"heartbeat_timeout": 1e12}, "heartbeat_timeout"),
    ],
)
def test_worker_refuses_options_it_could_not_use(options: dict[str, object], match: str) -> None:
    # A string of queues was read as one queue per letter; an infinite or NaN
    # number of seconds fails later, in SQL or in a sleep.
    queue = pgoutbox.Queue("", schema="unit")

    @queue.task
    async def work() -> None: ...

    with pytest.raises(pgoutbox.ConfigurationError, match=match):
        pgoutbox.Worker(queue, **options)  # type: ignore[arg-type]


def test_worker_may_wait_for_running_jobs_without_limit() -> None:
    queue = pgoutbox.Queue("", schema="unit")

    @queue.task
    async def work() -> None: ...

    assert pgoutbox.Worker(queue, shutdown_timeout=float("inf")).shutdown_timeout == float("inf")


@pytest.mark.parametrize(
    ("options", "match"), [({"max_size": 0}, "max_size"), ({"max_lifetime": 0}, "max_lifetime")]
)
def test_pool_refuses_a_size_no_borrower_could_use(options: dict[str, float], match: str) -> None:
    with pytest.raises(pgoutbox.ConfigurationError, match=match):
        pgoutbox.Pool("", **options)  # type: ignore[arg-type]


def test_a_handler_parameter_named_self_binds_like_any_other() -> None:
    queue = pgoutbox.Queue("", schema="unit")

    @queue.task
    async def method_like(self: int) -> None: ...

    assert method_like.bind(self=1).args == '{"self":1}'
    assert method_like.bind(2).args == '{"self":2}'
    assert pgoutbox.TaskRef(name="remote").bind(self=3).args == '{"self":3}'
