"""Tasks, their options and payload codec, without a database."""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Callable
from datetime import datetime

import msgspec
import pytest

from pgoutbox import ConfigurationError, PayloadError, Queue, RetryPolicy, Task, TaskRef
from pgoutbox.signals import Retry, Snooze


def test_task_default_name_is_module_and_qualname() -> None:
    queue = Queue("", schema="unit")

    @queue.task
    async def handler(x: int) -> None: ...

    assert (
        handler.name == f"{__name__}.test_task_default_name_is_module_and_qualname.<locals>.handler"
    )
    assert queue.get_task(handler.name) is handler


def test_task_options_and_duplicate_name() -> None:
    queue = Queue("", schema="unit")

    @queue.task(name="mail.send", queue="mail", priority=3, timeout=5)
    async def send(to: str) -> None: ...

    assert (send.name, send.queue, send.priority, send.timeout) == ("mail.send", "mail", 3, 5)
    with pytest.raises(ConfigurationError, match="already registered"):
        queue.task(name="mail.send")(send.fn)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"name": "bad name"}, "task name"),
        ({"name": ""}, "task name"),
        ({"queue": "q;drop"}, "queue name"),
        ({"priority": 40000}, "priority"),
        ({"priority": True}, "priority"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_task_invalid_options_raise_configuration_error(
    options: dict[str, object], match: str
) -> None:
    queue = Queue("", schema="unit")

    async def handler() -> None: ...

    with pytest.raises(ConfigurationError, match=match):
        queue.task(**options)(handler)  # type: ignore[call-overload]


def test_task_rejects_sync_and_variadic_handlers() -> None:
    queue = Queue("", schema="unit")

    def sync(x: int) -> None: ...

    async def variadic(*args: int) -> None: ...

    async def unencodable(x: object) -> None: ...

    with pytest.raises(ConfigurationError, match="async def"):
        queue.task(sync)  # type: ignore[type-var, arg-type]
    with pytest.raises(ConfigurationError, match=r"\*args"):
        queue.task(variadic)
    queue.task(unencodable)  # `object` means "any JSON value"


def test_task_encode_validates_and_decode_round_trips() -> None:
    queue = Queue("", schema="unit")

    @queue.task
    async def book(room: int, when: datetime, guests: list[str] | None = None) -> None: ...

    when = datetime.fromisoformat("2026-01-02T03:04:05+00:00")
    data = book.encode_args((12,), {"when": when})
    assert book.decode_args(data) == {"room": 12, "when": when, "guests": None}
    with pytest.raises(PayloadError, match=r"\$\.room"):
        book.encode_args(("12",), {"when": when})
    with pytest.raises(PayloadError, match="missing a required argument"):
        book.encode_args((), {})
    with pytest.raises(PayloadError, match="guests"):
        book.decode_args('{"room": 1, "when": "2026-01-02T03:04:05Z", "guests": [1]}')
    with pytest.raises(PayloadError, match="unknown field"):
        book.decode_args('{"room": 1, "when": "2026-01-02T03:04:05Z", "extra": 1}')


def _assert_binds_like_a_call(
    task: Task[..., object],
    handler: Callable[..., object],
    args: tuple[object, ...],
    kwargs: dict[str, object],
    defaults: dict[str, object],
) -> None:
    """`task` accepts exactly the calls `handler` accepts, with the same arguments
    (plus `defaults`), and refuses the others with the message Python gives."""
    try:
        expected = inspect.signature(handler).bind(*args, **kwargs).arguments
    except TypeError as ex:
        with pytest.raises(PayloadError, match=re.escape(str(ex))):
            task.encode_args(args, kwargs)
    else:
        assert task.decode_args(task.encode_args(args, kwargs)) == {**defaults, **expected}


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1, "a"), {}),
        ((1,), {"name": "a"}),
        ((), {"count": 1, "name": "a", "flag": True}),
        ((1, "a", True), {}),  # flag is keyword-only
        ((1,), {}),  # name is missing
        ((1, "a"), {"count": 2}),  # count twice
        ((1, "a"), {"other": 1}),  # no such parameter
    ],
)
def test_task_binds_arguments_as_a_call_would(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    queue = Queue("", schema="unit")

    async def handler(count: int, name: str, *, flag: bool = False) -> None: ...

    _assert_binds_like_a_call(queue.task(handler), handler, args, kwargs, {"flag": False})


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1,), {}),  # the one-argument fast path
        ((), {"count": 1}),
        ((), {}),  # count is missing
        ((1, 2), {}),  # one too many
        ((1,), {"count": 2}),  # count twice
    ],
)
def test_task_binds_a_single_parameter_as_a_call_would(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    queue = Queue("", schema="unit")

    async def handler(count: int) -> None: ...

    _assert_binds_like_a_call(queue.task(handler), handler, args, kwargs, {})


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1,), {}),  # token (keyword-only, required) is missing
        ((1,), {"token": "t"}),
        ((), {"count": 1, "token": "t"}),
    ],
)
def test_task_binds_a_required_keyword_only_parameter_as_a_call_would(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    queue = Queue("", schema="unit")

    async def handler(count: int, *, token: str) -> None: ...

    _assert_binds_like_a_call(queue.task(handler), handler, args, kwargs, {})


def test_task_options_validate_delay_and_run_at() -> None:
    queue = Queue("", schema="unit")

    @queue.task
    async def later() -> None: ...

    with pytest.raises(ConfigurationError, match="delay"):
        later.options(delay=-1)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        later.options(run_at=datetime(2030, 1, 1))  # noqa: DTZ001 (the point of the test)
    assert later.options(queue="other").queue == "other"
    assert later.queue == "default"


def test_task_ref_validates() -> None:
    with pytest.raises(ConfigurationError, match="queue name"):
        TaskRef(name="ok", queue="no spaces")
    with pytest.raises(ConfigurationError, match="max_attempts"):
        TaskRef(name="ok", max_attempts=0)


def test_retry_policy_intervals_grow_and_cap() -> None:
    random.seed(1)
    policy = RetryPolicy(initial_interval=1, multiplier=2, max_interval=10, jitter=0)
    assert [policy.interval(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    jittery = RetryPolicy(initial_interval=10, jitter=0.5)
    assert all(5 <= jittery.interval(1) <= 15 for _ in range(100))


def test_retry_policy_retries_only_listed_exceptions() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(ValueError,))
    assert policy.retries(ValueError())
    assert not policy.retries(KeyError())


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        # A snooze adds an attempt: near the integer's limit it would overflow it.
        {"max_attempts": 2**31 - 1},
        {"max_attempts": 1_000_001},
        {"multiplier": 0.5},
        {"multiplier": float("inf")},
        {"jitter": 1.0},
        {"jitter": float("nan")},
        {"initial_interval": -1},
        {"initial_interval": "1"},
        {"initial_interval": float("inf"), "max_interval": float("inf")},
        {"max_interval": float("nan")},
        {"max_interval": 1e13},
        {"retry_on": [ValueError]},
        {"retry_on": (ValueError, "KeyError")},
    ],
)
def test_retry_policy_rejects_bad_values(options: dict[str, object]) -> None:
    # A wait PostgreSQL cannot add to now() (NaN, infinite, past its interval
    # range) would fail the outcome's write and with it the worker's whole batch.
    field = next(iter(options))
    with pytest.raises(ConfigurationError, match=field):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_retry_policy_takes_one_exception_type_or_a_tuple() -> None:
    assert RetryPolicy(retry_on=KeyError).retries(KeyError())  # type: ignore[arg-type]
    assert not RetryPolicy(retry_on=(KeyError,)).retries(ValueError())


@pytest.mark.parametrize("multiplier", [10, 10.0], ids=["int", "float"])
def test_retry_policy_interval_stays_capped_where_growth_overflows(multiplier: float) -> None:
    policy = RetryPolicy(multiplier=multiplier, max_interval=60, jitter=0)
    assert policy.interval(5_000) == 60


@pytest.mark.parametrize("after", [-1, float("nan"), float("inf"), 1e13, "5"])
@pytest.mark.parametrize("signal", [Retry, Snooze])
def test_retry_and_snooze_refuse_a_wait_that_is_not_a_number_of_seconds(
    signal: type[Retry] | type[Snooze], after: object
) -> None:
    with pytest.raises(ValueError, match=r"after=\.\.\.\) must be a number of seconds"):
        signal(after)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "5"])
def test_task_timeout_must_be_a_positive_number_of_seconds(timeout: object) -> None:
    queue = Queue("", schema="unit")

    async def handler() -> None: ...

    with pytest.raises(ConfigurationError, match="timeout"):
        queue.task(timeout=timeout)(handler)  # type: ignore[arg-type]


def test_task_retry_must_be_a_retry_policy() -> None:
    queue = Queue("", schema="unit")

    async def handler() -> None: ...

    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        queue.task(retry=3)(handler)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["", "x" * 501, "a\x00b", "\ud800", 7])
def test_a_unique_key_must_be_a_short_string(key: object) -> None:
    queue = Queue("", schema="unit")

    @queue.task
    async def work() -> None: ...

    with pytest.raises(ConfigurationError, match="key"):
        work.options(key=key)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="key"):
        TaskRef(name="t", key=key)  # type: ignore[arg-type]
    assert work.options(key="x" * 500).bind().key == "x" * 500


def test_queue_without_dsn_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGOUTBOX_DSN", raising=False)
    with pytest.raises(ConfigurationError, match="PGOUTBOX_DSN"):
        _ = Queue(schema="unit").conninfo
    monkeypatch.setenv("PGOUTBOX_DSN", "dbname=x")
    assert Queue(schema="unit").conninfo == "dbname=x"


@pytest.mark.parametrize(
    ("dsn", "match"),
    [
        ("host=127.0.0.1 password=S3cret PW", "not valid libpq syntax"),
        ("postgresql://bob:S3cret@PW@127.0.0.1:5432/db", "%40"),
    ],
)
def test_queue_refuses_a_malformed_dsn_without_quoting_it(dsn: str, match: str) -> None:
    # libpq's messages quote the text around the mistake: here, the password.
    with pytest.raises(ConfigurationError, match=match) as raised:
        _ = Queue(dsn, schema="unit").conninfo
    assert "S3cret" not in str(raised.value)
    assert "PW" not in str(raised.value)


@pytest.mark.parametrize(
    "value", ["\ud800", "a\x00b", float("nan"), [[[[]]]] * 1], ids=["surrogate", "nul", "nan", "ok"]
)
def test_task_encode_refuses_what_postgres_or_the_worker_cannot_take(value: object) -> None:
    queue = Queue("", schema="unit")

    @queue.task
    async def takes_int(x: int) -> None: ...

    @queue.task
    async def takes_str(x: str) -> None: ...

    @queue.task
    async def takes_float(x: float) -> None: ...

    @queue.task
    async def takes_any(x: object) -> None: ...

    for task in (takes_int, takes_str, takes_float, takes_any):
        try:
            text = task.encode_args((value,), {})
        except PayloadError:
            continue
        # What was accepted must decode back in the worker.
        assert task.decode_args(text) is not None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_float_is_refused_where_null_would_have_taken_its_place(
    value: float,
) -> None:
    # JSON has no NaN or infinity; stored as null, an optional float would reach
    # the handler as None, and a job enqueued by name would fail for good.
    queue = Queue("", schema="unit")

    @queue.task
    async def optional(x: float | None = None) -> None: ...

    @queue.task
    async def anything(x: object = None) -> None: ...

    @queue.task
    async def nested(x: dict[str, list[float]] | None = None) -> None: ...

    for task, arg in ((optional, value), (anything, {"a": [1, value]}), (nested, {"a": [value]})):
        with pytest.raises(PayloadError, match="NaN or infinite"):
            task.bind(arg)
    with pytest.raises(PayloadError, match="NaN or infinite"):
        TaskRef(name="elsewhere").bind(x=[value])
    assert optional.bind(None).args == '{"x":null}'


def test_the_search_for_nan_passes_over_values_only_msgspec_encodes() -> None:
    # msgspec.to_builtins refuses UNSET and Raw, which the encoder takes as they are.
    queue = Queue("", schema="unit")

    @queue.task
    async def raw(blob: msgspec.Raw, ratio: float) -> None: ...

    @queue.task
    async def unset(
        opt: int | msgspec.UnsetType = msgspec.UNSET, ratio: float = 1.0, note: str | None = None
    ) -> None: ...

    assert raw.bind(msgspec.Raw(b'{"x":null}'), 1.0).args == '{"blob":{"x":null},"ratio":1.0}'
    assert unset.bind().args == '{"ratio":1.0,"note":null}'
    assert TaskRef(name="elsewhere").bind(blob=msgspec.Raw(b"null")).args == '{"blob":null}'
