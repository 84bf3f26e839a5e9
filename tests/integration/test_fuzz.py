"""Hostile input to `Queue(...)` and `Queue.enqueue`: a typed error or a faithful write.

Every case either succeeds, writing exactly one row that holds what was asked
for, or raises `PayloadError` or `ConfigurationError` and writes nothing: the
caller's transaction stays usable and commits without a new row. Any other
exception fails the test with its own traceback. Identifiers never reach SQL
as text: after any schema, task or queue name, the database's schemas and
relations are the ones it had before.

Hypothesis drives sync tests; each reaches the async API through a blocking
portal on one backend (asyncio, trio).
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from functools import partial
from typing import Any, Final, TypeVar

import msgspec
import pytest
from anyio.from_thread import BlockingPortal
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from psycopg import pq, sql

import pgoutbox
from pgoutbox import (
    ConfigurationError,
    Job,
    JobSpec,
    PayloadError,
    PgoutboxError,
    Queue,
    TaskRef,
)

T = TypeVar("T")

TYPED_ERRORS: Final = (PayloadError, ConfigurationError)

FUZZ: Final = settings(
    max_examples=60,
    deadline=None,
    database=None,  # the examples depend on a throw-away schema; nothing worth replaying
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_SCHEMA_RULE: Final = re.compile(r"[a-z_][a-z0-9_]{0,47}")
"""What `Queue` documents as a valid schema name."""

_CATALOG: Final = """
    SELECT n.nspname, c.relname, c.relkind
    FROM pg_namespace AS n LEFT JOIN pg_class AS c ON c.relnamespace = n.oid
    WHERE n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'
"""


# -- handlers of every parameter shape a payload meets -------------------------


async def takes_int(x: int) -> None: ...
async def takes_float(x: float) -> None: ...
async def takes_str(x: str) -> None: ...
async def takes_bytes(x: bytes) -> None: ...
async def takes_any(x: Any) -> None: ...
async def takes_list(x: list[int]) -> None: ...
async def takes_dict(x: dict[str, float]) -> None: ...
async def takes_datetime(x: datetime) -> None: ...
async def takes_optional(x: int | None = None, *, label: str = "") -> None: ...


HANDLERS: Final[tuple[Callable[..., Awaitable[None]], ...]] = (
    takes_int,
    takes_float,
    takes_str,
    takes_bytes,
    takes_any,
    takes_list,
    takes_dict,
    takes_datetime,
    takes_optional,
)


# -- the database, reached from sync tests through a portal --------------------


@dataclass(frozen=True)
class _Env:
    portal: BlockingPortal
    dsn: str
    queue: Queue
    conn: pgoutbox.Connection[Any]  # not autocommit: each case runs in a transaction
    tasks: dict[str, pgoutbox.Task[..., None]]

    def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        return self.portal.call(partial(fn, *args, **kwargs))


async def _open(portal: BlockingPortal, dsn: str) -> _Env:
    queue = Queue(dsn, schema=f"fz_{secrets.token_hex(6)}")
    await queue.migrate()
    tasks = {fn.__name__: queue.task(name=f"fuzz.{fn.__name__}")(fn) for fn in HANDLERS}
    conn = await pgoutbox.connect(dsn)
    return _Env(portal, dsn, queue, conn, tasks)


async def _close(env: _Env) -> None:
    try:
        async with env.conn.transaction():
            await env.conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(env.queue.schema))
            )
    finally:
        await env.conn.close()
        await env.queue.aclose()


@pytest.fixture(scope="module")
def env(blocking_portal: BlockingPortal, database_dsn: str) -> Iterator[_Env]:
    """A migrated queue with one task per handler shape, on one backend."""
    opened = blocking_portal.call(_open, blocking_portal, database_dsn)
    try:
        yield opened
    finally:
        blocking_portal.call(_close, opened)


async def _rows(env: _Env, query: str, *params: object) -> list[tuple[Any, ...]]:
    """A test-owned statement ({schema} is the queue's quoted schema), in its own transaction."""
    statement = sql.SQL(query).format(schema=sql.Identifier(env.queue.schema))
    async with env.conn.transaction():
        cur = await env.conn.execute(statement, params or None)
        return list(await cur.fetchall())


async def _count(env: _Env) -> int:
    return int((await _rows(env, "SELECT count(*) FROM {schema}.jobs"))[0][0])


async def _catalog(env: _Env) -> set[tuple[Any, ...]]:
    return set(await _rows(env, _CATALOG))


@dataclass(frozen=True)
class _Case:
    """How one enqueue ended, and the row it wrote if it succeeded."""

    job: Job | None
    error: PgoutboxError | None
    written: dict[str, Any] | None

    def check(self) -> dict[str, Any] | None:
        """Assert the case raised a typed error or wrote one row; return that row."""
        if self.error is not None:
            assert isinstance(self.error, TYPED_ERRORS), f"untyped pgoutbox error {self.error!r}"
            return None
        assert self.job is not None
        assert self.written is not None, "enqueue succeeded but its row is missing"
        return self.written


_STORED: Final = """
    SELECT task, queue, priority, max_attempts, state::text, args::text, run_at, created_at
    FROM {schema}.jobs WHERE id = %s
"""


async def _enqueue(env: _Env, attempt: Callable[[], Awaitable[Job]]) -> _Case:
    """Run one enqueue in a transaction that commits even if enqueue refused the job.

    Any exception but a `PgoutboxError` propagates (and rolls the transaction back).
    """
    before = await _count(env)
    job: Job | None = None
    error: PgoutboxError | None = None
    async with env.conn.transaction():
        try:
            job = await attempt()
        except PgoutboxError as ex:
            error = ex  # the caller carries on: its transaction must still be usable
        status = env.conn.info.transaction_status
        assert status is not pq.TransactionStatus.INERROR, (
            f"enqueue raised {error!r} after aborting the caller's transaction"
        )
    after = await _count(env)
    if job is None:
        assert after == before, f"{error!r} was raised, yet {after - before} rows were written"
        return _Case(None, error, None)
    assert after == before + 1, f"one enqueue wrote {after - before} rows"
    rows = await _rows(env, _STORED, job.id)
    keys = ("task", "queue", "priority", "max_attempts", "state", "args", "run_at", "created_at")
    return _Case(job, None, dict(zip(keys, rows[0], strict=True)) if rows else None)


# -- strategies ----------------------------------------------------------------


def _nest(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class _Deep:
    """Stands for `depth` nested lists, built just before the call (too deep to print)."""

    depth: int


@dataclass(frozen=True)
class _Cycle:
    """Stands for a list that contains itself, built just before the call."""


def _build(value: Any) -> Any:
    """`value` with every `_Deep` and `_Cycle` replaced by what it stands for."""
    if isinstance(value, _Deep):
        return _nest(value.depth)
    if isinstance(value, _Cycle):
        loop: list[object] = []
        loop.append(loop)
        return loop
    if type(value) is list:
        return [_build(v) for v in value]
    if type(value) is tuple:
        return tuple(_build(v) for v in value)
    if type(value) is dict:
        return {k: _build(v) for k, v in value.items()}
    return value


class _NoOffset(tzinfo):
    """A tzinfo that is not None but gives no offset: a naive datetime in disguise."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


_HUGE_INTS: Final = (2**15, -(2**15) - 1, 2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64, 10**40)

_hashable = st.one_of(
    st.integers(),
    st.sampled_from(_HUGE_INTS),
    st.floats(),
    st.none(),
    st.booleans(),
    st.binary(max_size=4),
    st.tuples(st.integers()),
    st.frozensets(st.integers(), max_size=2),
)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(_HUGE_INTS),
    st.floats(),  # NaN, infinities, -0.0, subnormals
    st.text(),  # NUL among them
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.binary(),
    st.binary().map(bytearray),
    st.decimals(),  # NaN and sNaN among them
    st.fractions(),
    st.complex_numbers(),
    st.datetimes(),
    st.uuids(),
    st.builds(object),
    st.sampled_from([Ellipsis, int, print, NotImplemented]),
    st.integers(0, 5000).map(_Deep),
    st.builds(_Cycle),
)

junk = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
        st.dictionaries(_hashable, children, max_size=3),  # non-str keys
        st.frozensets(_hashable, max_size=3),
    ),
    max_leaves=8,
)

_SQL_NAMES: Final = (
    "x'; DROP TABLE jobs; --",
    'x"; DROP SCHEMA public CASCADE; --',
    "x') OR ('1'='1",
    "x; DELETE FROM jobs",
    "$$; DROP TABLE jobs; $$",
    "a--b",
    "a<>b",
    "pg_catalog.pg_class",
    "default",
    "'",
    '"',
    "\\",
    "",
    " ",
    "a\x00b",
    "a\nb",
    "Ω",
)

names = st.one_of(
    st.text(),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:<>\-]{0,40}", fullmatch=True),
    st.sampled_from(_SQL_NAMES),
    st.integers(150, 260).map(lambda n: "n" * n),  # around the length limit
    st.integers(),
    st.none(),
    st.binary(max_size=5),
    st.builds(object),
)

numbers = st.one_of(
    st.integers(-5, 5),
    st.integers(),
    st.sampled_from(_HUGE_INTS),
    st.floats(),
    st.sampled_from([1e-300, 5e-324, 1e15, 1e16, 1e300, 3.2e9, 3.2e11]),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(max_magnitude=10),
    st.builds(object),
)

run_ats = st.one_of(
    st.none(),
    st.datetimes(),  # naive
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(timezones=st.timedeltas(-timedelta(hours=23), timedelta(hours=23)).map(timezone)),
    st.sampled_from(  # the ends of Python's calendar, pushed past them in UTC
        [
            datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
            datetime.max.replace(tzinfo=timezone(-timedelta(hours=5))),
        ]
    ),
    st.datetimes(timezones=st.builds(_NoOffset)),
    st.text(max_size=10),
    st.integers(),
    st.floats(),
)


# -- payloads ------------------------------------------------------------------


def _json_equal(stored: str, sent: str) -> bool:
    """Equal as JSON, with numbers compared by value (jsonb rewrites 1e300 as digits).

    However deep: hypothesis raises the recursion limit while a test runs, so the
    queue encodes nesting that json.loads, deeper in the stack, would refuse.
    """
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 10_000)
    try:
        return bool(
            json.loads(stored, parse_float=Decimal, parse_int=Decimal)
            == json.loads(sent, parse_float=Decimal, parse_int=Decimal)
        )
    finally:
        sys.setrecursionlimit(limit)


def _encode_as_stored(value: Any) -> str:
    """`value` encoded as the queue encoded it, however deep.

    msgspec's depth limit is Python's recursion limit counted from the caller's
    stack: nesting a little under it encodes in the portal's thread (a short
    stack) and can overflow in this one (pytest's and hypothesis's frames).
    """
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 10_000)
    try:
        return msgspec.json.encode(value).decode()
    finally:
        sys.setrecursionlimit(limit)


@settings(FUZZ)
@given(kwargs=st.dictionaries(st.text(max_size=6), junk, max_size=4))
@example(kwargs={"s": "a\x00b"})
@example(kwargs={"deep": _Deep(5000)})
def test_enqueue_by_name_with_hostile_payload(env: _Env, kwargs: dict[str, Any]) -> None:
    """By name the payload is not checked against a handler, only encoded: JSON or typed error."""
    kwargs = _build(kwargs)
    case = env.call(_enqueue, env, lambda: env.queue.enqueue(env.conn, "fuzz.by_name", **kwargs))
    row = case.check()
    if row is not None:
        sent = _encode_as_stored(kwargs)
        assert _json_equal(row["args"], sent), f"stored {row['args']!r}, encoded {sent!r}"


async def _enqueue_many_stored(env: _Env, specs: list[JobSpec]) -> list[str]:
    """enqueue_many `specs` in one committed transaction; the args each job row holds."""
    async with env.conn.transaction():
        jobs = await env.queue.enqueue_many(env.conn, specs)
    assert [j.task for j in jobs] == [s.task for s in specs]
    stored = dict(
        await _rows(
            env, "SELECT id, args::text FROM {schema}.jobs WHERE id = ANY(%s)", [j.id for j in jobs]
        )
    )
    return [stored[j.id] for j in jobs]


@settings(FUZZ)
@given(
    payloads=st.lists(st.dictionaries(st.text(max_size=6), junk, max_size=3), max_size=4),
    mixed=st.booleans(),
)
@example(payloads=[{"s": "a\x00b"}, {"n": 2**64}, {"d": _Deep(5000)}], mixed=False)
@example(payloads=[{"": [_Deep(1987)]}], mixed=False)  # accepted, and too deep for json.loads
def test_enqueue_many_with_hostile_payloads(
    env: _Env, payloads: list[dict[str, Any]], mixed: bool
) -> None:
    """enqueue_many stores each accepted payload as encoded, whether its jobs share their
    task and options (one JSON array of arguments) or not (one JSON object per job)."""
    specs: list[JobSpec] = []
    for kwargs in payloads:
        try:
            specs.append(TaskRef(name="fuzz.by_name").bind(**_build(kwargs)))
        except PayloadError:
            continue
    if mixed:
        specs.append(TaskRef(name="fuzz.other", priority=1).bind(x=1))
    assume(specs)
    stored = env.call(_enqueue_many_stored, env, specs)
    for spec, args in zip(specs, stored, strict=True):
        assert _json_equal(args, spec.args), f"stored {args!r}, encoded {spec.args!r}"


@settings(FUZZ)
@given(
    handler=st.sampled_from([fn.__name__ for fn in HANDLERS]),
    call=st.one_of(
        junk.map(lambda value: ((value,), {})),
        st.tuples(
            st.lists(junk, max_size=2).map(tuple),
            st.dictionaries(
                st.sampled_from(["x", "label", "y"]) | st.text(max_size=3), junk, max_size=3
            ),
        ),
    ),
)
@example(handler="takes_float", call=((float("nan"),), {}))
@example(handler="takes_any", call=((object(),), {}))
@example(handler="takes_str", call=(("a\x00b",), {}))
@example(handler="takes_any", call=((_Deep(5000),), {}))
def test_enqueue_task_with_hostile_arguments(
    env: _Env, handler: str, call: tuple[tuple[Any, ...], dict[str, Any]]
) -> None:
    """A payload that enqueue accepts for a task is one its worker can decode again."""
    task = env.tasks[handler]
    args, kwargs = _build(call)
    case = env.call(_enqueue, env, lambda: env.queue.enqueue(env.conn, task, *args, **kwargs))
    row = case.check()
    if row is not None:
        try:
            task.decode_args(row["args"])
        except PayloadError as ex:
            pytest.fail(
                f"enqueue stored {row['args']!r} for {handler}, the worker rejects it: {ex}"
            )


# -- names ---------------------------------------------------------------------


@settings(FUZZ)
@given(name=names, queue_name=names, how=st.sampled_from(["ref", "string", "options"]))
@example(name="x'; DROP TABLE jobs; --", queue_name="default", how="string")
@example(name="ok", queue_name='q"; DROP SCHEMA public CASCADE; --', how="options")
def test_enqueue_with_hostile_task_and_queue_names(
    env: _Env, name: Any, queue_name: Any, how: str
) -> None:
    """Names are validated or stored verbatim as values; no name changes the catalog."""
    before = env.call(_catalog, env)

    def attempt() -> Awaitable[Job]:
        if how == "ref":
            return env.queue.enqueue(env.conn, TaskRef(name=name, queue=queue_name))
        if how == "string":
            return env.queue.enqueue(env.conn, name)
        return env.queue.enqueue(env.conn, env.tasks["takes_int"].options(queue=queue_name), 1)

    row = env.call(_enqueue, env, attempt).check()
    if row is not None:
        expected_task = "fuzz.takes_int" if how == "options" else name
        expected_queue = "default" if how == "string" or queue_name is None else queue_name
        assert (row["task"], row["queue"]) == (expected_task, expected_queue)
    assert env.call(_catalog, env) == before, "a name changed the database's catalog"


# -- priorities, attempts, delays ----------------------------------------------


@settings(FUZZ)
@given(
    priority=numbers,
    delay=numbers,
    max_attempts=numbers,
    run_at=run_ats,
    how=st.sampled_from(["ref", "options"]),
)
@example(priority=0, delay=1e16, max_attempts=1, run_at=None, how="options")
@example(priority=0, delay="5", max_attempts=1, run_at=None, how="options")
@example(priority=0, delay=Decimal("NaN"), max_attempts=1, run_at=None, how="options")
@example(
    priority=0,
    delay=0,
    max_attempts=1,
    run_at=datetime(2030, 1, 1, tzinfo=_NoOffset()),
    how="ref",
)
@example(  # "never": stored as year 10000 UTC, which the RETURNING row cannot hold
    priority=0,
    delay=0,
    max_attempts=1,
    run_at=datetime.max.replace(tzinfo=timezone(-timedelta(hours=1))),
    how="ref",
)
@example(
    priority=0,
    delay=1,
    max_attempts=1,
    run_at=datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
    how="ref",
)
def test_enqueue_with_hostile_numbers(
    env: _Env, *, priority: Any, delay: Any, max_attempts: Any, run_at: Any, how: str
) -> None:
    """Priority, max_attempts, delay and run_at: rejected with a typed error or stored as given."""

    def attempt() -> Awaitable[Job]:
        if how == "ref":
            ref = TaskRef(
                name="fuzz.numbers",
                priority=priority,
                delay=delay,
                max_attempts=max_attempts,
                run_at=run_at,
            )
            return env.queue.enqueue(env.conn, ref)
        task = env.tasks["takes_int"].options(priority=priority, delay=delay, run_at=run_at)
        return env.queue.enqueue(env.conn, task, 1)

    row = env.call(_enqueue, env, attempt).check()
    if row is None:
        return
    if how == "options":  # None keeps the task's own option
        priority = 0 if priority is None else priority
        delay = 0.0 if delay is None else delay
    assert row["priority"] == priority
    if how == "ref":
        assert row["max_attempts"] == max_attempts
    delayed = delay > 0 or (run_at is not None and run_at > row["created_at"])
    assert row["state"] == ("scheduled" if delayed else "available")
    if run_at is not None and delayed:
        assert row["run_at"] == run_at
    elif delayed:
        waited = (row["run_at"] - row["created_at"]).total_seconds()
        assert abs(waited - float(delay)) <= max(1e-3, 1e-9 * float(delay)), (waited, delay)


# -- schema names --------------------------------------------------------------


async def _probe_schema(env: _Env, schema: Any) -> tuple[Queue | None, BaseException | None]:
    """Make a Queue for `schema` and, if that works, ask it for its schema version."""
    try:
        queue = Queue(env.dsn, schema=schema)
    except ConfigurationError as ex:
        return None, ex
    try:
        await queue.check_schema(env.conn)
    except pgoutbox.SchemaError as ex:
        return queue, ex
    finally:
        await queue.aclose()
    return queue, None


_SQL_SCHEMAS: Final = (
    'x"; DROP TABLE jobs; --',
    "x; DROP SCHEMA public CASCADE",
    "public; CREATE TABLE pwned (i int)",
    'public"."jobs',
    "a.b",
    "'",
    '"',
    '""',
    "",
    "Public",
    "ünïcödé",
    "a\x00b",
    "a b",
    "a" * 49,
    "a" * 64,
    "a" * 10_000,
    "public",
    "pg_catalog",
    "information_schema",
)


@settings(FUZZ)
@given(
    schema=st.one_of(
        st.text(),
        st.sampled_from(_SQL_SCHEMAS),
        st.from_regex(r"[a-z_][a-z0-9_]{0,60}", fullmatch=True),
        st.text(alphabet="abc_;'\"$-.()", min_size=1, max_size=60),
        st.integers(),
        st.none(),
        st.binary(max_size=5),
        st.builds(object),
    )
)
def test_queue_with_hostile_schema_name(env: _Env, schema: Any) -> None:
    """A schema name is refused with ConfigurationError or used only as a quoted identifier."""
    before = env.call(_catalog, env)
    queue, error = env.call(_probe_schema, env, schema)
    if queue is None:
        assert isinstance(error, ConfigurationError)
    else:
        assert isinstance(schema, str)
        assert _SCHEMA_RULE.fullmatch(schema), f"Queue accepted schema name {schema!r}"
        assert queue.schema == schema
        assert error is None or isinstance(error, pgoutbox.SchemaError)
    assert env.call(_catalog, env) == before, "a schema name changed the database's catalog"


async def _migrate(env: _Env, schema: str) -> tuple[BaseException | None, set[tuple[Any, ...]]]:
    """Migrate a new schema; return the typed error, if any, and the relations it made."""
    queue = Queue(env.dsn, schema=schema)
    try:
        await queue.migrate()
    except PgoutboxError as ex:
        return ex, set()
    finally:
        await queue.aclose()
    made = {row for row in await _catalog(env) if row[0] == schema}
    async with env.conn.transaction():
        await env.conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return None, made


@settings(FUZZ, max_examples=15)
@given(schema=st.from_regex(r"[a-z_][a-z0-9_]{0,47}", fullmatch=True))
@example(schema="pg_jobs")
@example(schema="select")
def test_schema_name_queue_accepts_can_be_migrated(env: _Env, schema: str) -> None:
    """Whatever name `Queue` accepts, migrate installs it there or raises a typed error."""
    assume(not any(row[0] == schema for row in env.call(_catalog, env)))
    try:
        Queue(env.dsn, schema=schema)
    except ConfigurationError:
        return  # refusing a name up front is fine too
    error, made = env.call(_migrate, env, schema)
    if error is None:
        assert {(schema, "jobs", "r"), (schema, "workers", "r")} <= made
    else:
        assert isinstance(error, (*TYPED_ERRORS, pgoutbox.SchemaError))
