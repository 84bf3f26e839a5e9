"""Tasks: a handler, its options, and the codec built once for its parameters."""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Generic, ParamSpec, TypeVar, get_type_hints

import msgspec
import msgspec.inspect

from ._job import JobSpec
from .errors import ConfigurationError, PayloadError

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PRIORITY",
    "DEFAULT_QUEUE",
    "RetryPolicy",
    "Task",
    "TaskRef",
    "validate_name",
    "validate_priority",
]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_QUEUE: Final = "default"
"""The queue a task's jobs wait in unless it names another."""

DEFAULT_PRIORITY: Final = 0
"""A job's priority unless the task or the call gives one; higher runs first."""

DEFAULT_MAX_ATTEMPTS: Final = 20
"""Attempts a job gets unless its retry policy says otherwise."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:<>\-]{0,199}$")
_PRIORITY_RANGE: Final = range(-32768, 32768)
MAX_ATTEMPTS: Final = 1_000_000
"""The most attempts a job may have. Each snooze, and each attempt a stopping
worker gives back, raises a job's max_attempts by one: this leaves room for
two billion of them in the column's integer."""
MAX_DELAY: Final = 100 * 365 * 24 * 3600.0
"""The longest delay, retry wait or timeout, in seconds: a century; past that it is a mistake."""
_RUN_AT_YEARS: Final = (1970, 9999)


def validate_name(kind: str, value: object) -> str:
    """Return `value` if it is a valid task or queue name, else raise `ConfigurationError`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigurationError(
            f"invalid {kind} name {value!r}: use 1-200 characters from letters, digits, "
            "'_', '.', ':', '<', '>' and '-', starting with a letter or '_'"
        )
    return value


def validate_priority(value: object) -> int:
    """Return `value` if it is a valid priority (a 16-bit integer), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in _PRIORITY_RANGE:
        raise ConfigurationError(
            f"invalid priority {value!r}: use an integer from -32768 to 32767 (higher runs first)"
        )
    return value


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How often and how soon a failed job is tried again.

    The n-th retry waits ``initial_interval * multiplier ** (n - 1)`` seconds,
    at most `max_interval`, spread by ±`jitter` (a fraction) so that jobs that
    failed together do not all come back together.

    Attributes:
        max_attempts: attempts in all, the first run included (>= 1).
        initial_interval: seconds before the first retry.
        multiplier: growth of the interval per retry (>= 1).
        max_interval: the longest wait between attempts, in seconds.
        jitter: the random spread of each wait, as a fraction in [0, 1).
        retry_on: exception types that lead to a retry; others fail the job at once.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_interval: float = 1.0
    multiplier: float = 2.0
    max_interval: float = 3600.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        _validate_max_attempts(self.max_attempts)
        for field in ("initial_interval", "max_interval"):
            check_seconds(f"RetryPolicy {field}", getattr(self, field))
        if not _is_number(self.multiplier) or not 1 <= self.multiplier < math.inf:
            raise ConfigurationError(
                f"RetryPolicy multiplier must be a number >= 1, got {self.multiplier!r}"
            )
        if not _is_number(self.jitter) or not 0 <= self.jitter < 1:
            raise ConfigurationError(f"RetryPolicy jitter must be in [0, 1), got {self.jitter!r}")
        kinds = self.retry_on if isinstance(self.retry_on, tuple) else (self.retry_on,)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in kinds):
            raise ConfigurationError(
                f"RetryPolicy retry_on must be a tuple of exception types, got {self.retry_on!r}"
            )

    def interval(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        try:  # in floats: an int multiplier would grow an exact, ever larger int
            grown = float(self.initial_interval) * float(self.multiplier) ** (attempt - 1)
        except OverflowError:  # a float past its range, or an int too large for one
            grown = self.max_interval
        base = min(self.max_interval, grown)
        return base * (1 + self.jitter * (2 * random.random() - 1))  # noqa: S311 (not crypto)

    def retries(self, exc: BaseException) -> bool:
        """Whether `exc` is worth another attempt (if the job has attempts left)."""
        return isinstance(exc, self.retry_on)


def _args_struct(name: str, fn: Callable[..., Any]) -> type[msgspec.Struct]:
    """A msgspec Struct type with one field per parameter of `fn`."""
    try:
        hints = get_type_hints(fn)
    except Exception as ex:
        raise ConfigurationError(
            f"task {name!r}: cannot resolve the annotations of {fn.__qualname__}: {ex}"
        ) from ex
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigurationError(
                f"task {name!r}: parameter {param.name!r} is *args/**kwargs; a task's payload "
                "must be named parameters"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise ConfigurationError(
                f"task {name!r}: parameter {param.name!r} is positional-only; payload fields "
                "need names"
            )
        annotation = hints.get(param.name, Any)
        if param.default is param.empty:
            fields.append((param.name, annotation))
        else:
            fields.append((param.name, annotation, param.default))
    struct = msgspec.defstruct(
        f"{fn.__qualname__}.args", fields, kw_only=True, forbid_unknown_fields=True
    )
    try:
        msgspec.json.Decoder(struct)
    except TypeError as ex:
        raise ConfigurationError(
            f"task {name!r}: a parameter type cannot be encoded as JSON by msgspec: {ex}"
        ) from ex
    return struct


class Task(Generic[P, R]):
    """A registered handler with its options; create with `Queue.task`.

    Calling a task calls the handler directly (handy in tests); enqueue it with
    `Queue.enqueue`, whose arguments a type checker checks against the handler's.

    Attributes:
        name: the task name stored in each job.
        queue: the queue its jobs wait in.
        priority: its jobs' priority; higher runs first.
        retry: its retry policy.
        timeout: seconds an attempt may run before it is cancelled, or None.
        key: the unique key of the jobs enqueued through this copy (see
            `options`), or None.
        fn: the handler.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str,
        queue: str,
        priority: int,
        retry: RetryPolicy,
        timeout: float | None,
        delay: float = 0.0,
        run_at: datetime | None = None,
        key: str | None = None,
        args_type: type[msgspec.Struct] | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"task {name!r}: the handler must be an `async def` function")
        if timeout is not None and (not seconds_in_range(timeout) or not timeout > 0):
            raise ConfigurationError(
                f"task {name!r}: timeout must be a number of seconds above 0 (at most "
                f"{MAX_DELAY:.0f}) or None, got {timeout!r}"
            )
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"task {name!r}: retry must be a RetryPolicy, got {retry!r}")
        self.fn = fn
        self.name = validate_name("task", name)
        self.queue = validate_name("queue", queue)
        self.priority = validate_priority(priority)
        self.retry = retry
        self.timeout = timeout
        self.delay = delay
        self.run_at = run_at
        self.key = key
        self._args_type = args_type or _args_struct(name, fn)
        self._signature = inspect.signature(fn)
        self._decoder = msgspec.json.Decoder(self._args_type)
        self._floats = _may_hold_a_float(self._args_type)
        # For binding arguments without `Signature.bind` when the parameters are
        # plain (positional-or-keyword or keyword-only, no *args/**kwargs).
        params = list(self._signature.parameters.values())
        plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self._positional = (
            tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD) if plain else None
        )
        self._names = frozenset(p.name for p in params)
        self._required = frozenset(p.name for p in params if p.default is p.empty)
        self._required_positional = self._positional is not None and self._required <= set(
            self._positional
        )

    def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        """Call the handler directly, as if it were not a task."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name!r} queue={self.queue!r}>"

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        key: str | None = None,
    ) -> Task[P, R]:
        """This task with other options for the jobs enqueued through the copy.

        Args:
            queue: another queue to put the job in.
            priority: another priority; higher runs first.
            delay: seconds from now (the database's clock) before the job may run.
            run_at: an aware datetime before which the job does not run; when a
                copy has both, `run_at` decides and `delay` is ignored.
            key: a unique key (1 to 500 characters): while a job with this key
                is unfinished (scheduled, available, retryable or running), enqueue
                writes nothing and returns that job, marked
                `duplicate <pgoutbox.Job.duplicate>`.

        Raises:
            ConfigurationError: an option is invalid.
        """
        if delay is not None:
            _validate_delay(self.name, delay)
        _validate_run_at(self.name, run_at)
        _validate_key(self.name, key)
        return Task(
            self.fn,
            name=self.name,
            queue=self.queue if queue is None else queue,
            priority=self.priority if priority is None else priority,
            retry=self.retry,
            timeout=self.timeout,
            delay=self.delay if delay is None else delay,
            run_at=self.run_at if run_at is None else run_at,
            key=self.key if key is None else key,
            args_type=self._args_type,
        )

    def bind(self, /, *args: P.args, **kwargs: P.kwargs) -> JobSpec:
        """Validate arguments for this task and make a `JobSpec` of them (for `enqueue_many`).

        Raises:
            PayloadError: an argument is missing, unexpected or of the wrong type.
        """
        return JobSpec(
            task=self.name,
            queue=self.queue,
            priority=self.priority,
            max_attempts=self.retry.max_attempts,
            args=self.encode_args(args, kwargs),
            delay=self.delay,
            run_at=self.run_at,
            key=self.key,
        )

    def encode_args(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """Validate call arguments against the handler's parameters and encode them as JSON.

        Raises:
            PayloadError: an argument is missing, unexpected or of the wrong type.
        """
        arguments = self._bind_plain(args, kwargs)
        if arguments is None:  # not plain, or wrong: Signature.bind says what is wrong
            try:
                arguments = self._signature.bind(*args, **kwargs).arguments
            except TypeError as ex:
                raise PayloadError(self.name, str(ex)) from None
        try:
            payload = msgspec.convert(arguments, self._args_type)
        except msgspec.ValidationError as ex:
            raise PayloadError(self.name, str(ex)) from None
        except ValueError as ex:  # e.g. a lone surrogate in a str, seen while converting
            raise PayloadError(self.name, f"an argument cannot be converted: {ex}") from None
        except RecursionError:
            raise PayloadError(self.name, "the arguments are nested too deeply") from None
        text = encode_payload(self.name, payload, floats=self._floats)
        # What the worker cannot decode must not be written (e.g. NaN for a
        # float, which JSON stores as null).
        try:
            self._decoder.decode(text)
        except (msgspec.DecodeError, RecursionError) as ex:
            raise PayloadError(self.name, f"the arguments would not decode: {ex}") from None
        return text

    def _bind_plain(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The arguments by name, as `Signature.bind` would give them, for plain
        parameters; None when the parameters are not plain or the call does not
        fit them."""
        positional = self._positional
        if positional is None or len(args) > len(positional):
            return None
        if not kwargs and len(args) == 1 == len(positional) and self._required_positional:
            # The commonest call, one argument for one parameter: no zip.
            return {positional[0]: args[0]}
        arguments = dict(zip(positional, args, strict=False))
        if kwargs:
            for name in kwargs:
                if name in arguments or name not in self._names:
                    return None
            arguments.update(kwargs)
        elif len(args) == len(positional) and self._required_positional:
            return arguments  # every parameter given, and none is keyword-only required
        if not self._required <= arguments.keys():
            return None
        return arguments

    def decode_args(self, data: str) -> dict[str, Any]:
        """Decode a stored payload into keyword arguments for the handler.

        Raises:
            PayloadError: the payload does not fit the handler's parameters.
        """
        try:
            payload = self._decoder.decode(data)
        except msgspec.DecodeError as ex:
            raise PayloadError(self.name, str(ex)) from None
        except RecursionError:
            raise PayloadError(self.name, "the stored arguments are nested too deeply") from None
        return msgspec.structs.asdict(payload)


class TaskRef(msgspec.Struct, frozen=True, kw_only=True):
    """A task known only by name, for producers that do not import its handler.

    ``await queue.enqueue(conn, "billing.charge", order_id=7)`` uses the
    defaults below; pass a `TaskRef` to choose the queue and the rest. Its
    arguments are checked by the worker, not at enqueue.

    Attributes:
        name: the task name the worker registered.
        queue: the queue the worker consumes for it.
        priority: higher runs first.
        max_attempts: attempts in all.
        delay: seconds from now before the job may run.
        run_at: an aware datetime before which the job does not run; with both
            set, `run_at` decides and `delay` is ignored.
        key: a unique key, as in `Task.options`, or None.
    """

    name: str
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    delay: float = 0.0
    run_at: datetime | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        _check_options(
            self.name,
            self.queue,
            priority=self.priority,
            max_attempts=self.max_attempts,
            delay=self.delay,
            run_at=self.run_at,
            key=self.key,
        )

    def bind(self, /, **kwargs: Any) -> JobSpec:
        """Encode keyword arguments as JSON and make a `JobSpec` (checked by the worker).

        Raises:
            PayloadError: the arguments cannot be encoded as JSON.
        """
        payload = encode_payload(self.name, kwargs)
        return JobSpec(
            task=self.name,
            queue=self.queue,
            priority=self.priority,
            max_attempts=self.max_attempts,
            args=payload,
            delay=self.delay,
            run_at=self.run_at,
            key=self.key,
        )


def check_specs(specs: list[JobSpec]) -> None:
    """Raise unless each of `specs` is one that `Task.bind` or `TaskRef.bind` could
    have made. A spec with the same options as the one before it (the usual
    batch) has only its args and headers checked.

    Raises:
        ConfigurationError: an item is not a `JobSpec`; or a name, the
            priority, max_attempts, the delay, run_at or the headers are not valid.
        PayloadError: the args are not the text of one JSON object.
    """
    last: JobSpec | None = None
    for spec in specs:
        if not isinstance(spec, JobSpec):
            raise ConfigurationError(
                f"enqueue_many takes JobSpec items (from Task.bind), got {spec!r}"
            )
        if not (
            last is not None
            and spec.task is last.task
            and spec.queue is last.queue
            and spec.priority is last.priority
            and spec.max_attempts is last.max_attempts
            and spec.delay is last.delay
            and spec.run_at is last.run_at
            and spec.key is None
        ):
            _check_options(
                spec.task,
                spec.queue,
                priority=spec.priority,
                max_attempts=spec.max_attempts,
                delay=spec.delay,
                run_at=spec.run_at,
                key=spec.key,
            )
        if spec.headers is not None:
            _check_headers(spec)
        args = spec.args
        if not isinstance(args, str) or args[:1] != "{" or not _is_one_json_value(args):
            raise PayloadError(
                spec.task, "the args of a JobSpec must be the text of one JSON object"
            )
        last = spec


_raw_decoder = msgspec.json.Decoder(msgspec.Raw)


def _is_one_json_value(text: str) -> bool:
    """Whether `text` is one JSON value, nothing before or after it (checked, not
    built), that jsonb can store (no NUL character)."""
    try:
        _raw_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return False
    return not ("\\u0000" in text and _NUL_ESCAPE.search(text))


def _check_options(
    task: str,
    queue: str,
    *,
    priority: int,
    max_attempts: int,
    delay: float,
    run_at: datetime | None,
    key: str | None = None,
) -> None:
    """Raise `ConfigurationError` unless these are valid options for a job."""
    validate_name("task", task)
    validate_name("queue", queue)
    validate_priority(priority)
    _validate_max_attempts(max_attempts)
    _validate_delay(task, delay)
    _validate_run_at(task, run_at)
    _validate_key(task, key)


MAX_KEY_LENGTH: Final = 500
"""The longest unique key, in characters: it is an index entry."""


def _validate_key(task: str, key: object) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH or "\x00" in key:
        raise ConfigurationError(
            f"task {task!r}: key must be a string of 1 to {MAX_KEY_LENGTH} characters "
            f"without NUL, got {key!r:.80}"
        )
    try:
        key.encode()
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"task {task!r}: key must be valid Unicode (it holds a lone surrogate)"
        ) from None


def _check_headers(spec: JobSpec) -> None:
    if not (
        isinstance(spec.headers, dict)
        and all(
            isinstance(k, str) and isinstance(v, str) and "\x00" not in k + v
            for k, v in spec.headers.items()
        )
    ):
        raise ConfigurationError(
            f"task {spec.task!r}: headers must map strings without NUL characters to such "
            f"strings, got {spec.headers!r}"
        )


def _validate_max_attempts(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPTS:
        raise ConfigurationError(
            f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS:_}, got {value!r}"
        )


def _is_number(value: object) -> bool:
    """Whether `value` is an int or a float (not a bool); NaN is one, and fails every range."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def seconds_in_range(value: object) -> bool:
    """Whether `value` is a number of seconds from 0 to a century (so never NaN or infinite)."""
    return _is_number(value) and 0 <= value <= MAX_DELAY  # type: ignore[operator]


def check_seconds(what: str, value: object) -> None:
    """Raise `ConfigurationError` unless `value` is a number of seconds from 0 to a century."""
    if not seconds_in_range(value):
        raise ConfigurationError(
            f"{what} must be a number of seconds from 0 to {MAX_DELAY:.0f}, got {value!r}"
        )


def _validate_delay(task: str, delay: object) -> None:
    check_seconds(f"task {task!r}: delay", delay)


def _validate_run_at(task: str, run_at: object) -> None:
    if run_at is None:
        return
    if not isinstance(run_at, datetime) or run_at.utcoffset() is None:
        raise ConfigurationError(
            f"task {task!r}: run_at must be a timezone-aware datetime, got {run_at!r}"
        )
    try:
        in_utc = run_at.astimezone(UTC)
    except (OverflowError, ValueError):
        in_utc = None
    if in_utc is None or not _RUN_AT_YEARS[0] <= in_utc.year <= _RUN_AT_YEARS[1]:
        raise ConfigurationError(
            f"task {task!r}: run_at must fall between the years {_RUN_AT_YEARS[0]} and "
            f"{_RUN_AT_YEARS[1]} in UTC, got {run_at!r}"
        )


# A NUL escape not itself escaped: an odd number of backslashes before u0000.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_payload(task: str, value: object, *, floats: bool = True) -> str:
    """Encode arguments as JSON text that PostgreSQL's jsonb can store.

    With `floats` false the caller knows that `value` holds no float, and the
    search for NaN and infinities is skipped.

    Raises:
        PayloadError: the value cannot be encoded, or holds a NUL character, a
            NaN or an infinity.
    """
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as ex:
        raise PayloadError(task, f"cannot encode the arguments as JSON: {ex}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise PayloadError(
            task, "a string holds a NUL character (\\u0000), which PostgreSQL cannot store"
        )
    # JSON has no NaN or infinity: msgspec writes them as null, which the
    # handler would then get in their place (as None, or for a float a failed job).
    if floats and "null" in text and _has_non_finite(value):
        raise PayloadError(
            task, "a float is NaN or infinite, which JSON cannot hold (it would be stored as null)"
        )
    return text


_SCALARS: Final = (str, int, bytes, type(None), msgspec.Raw, msgspec.UnsetType)
_MAY_BE_FLOAT: Final = (
    msgspec.inspect.FloatType,
    msgspec.inspect.AnyType,
    msgspec.inspect.CustomType,
)


def _may_hold_a_float(struct: type[msgspec.Struct]) -> bool:
    """Whether a value of `struct` may hold a float anywhere (a float, `Any` or an
    arbitrary class in its type), so that encoding it must look for NaN."""
    pending: list[object] = [msgspec.inspect.type_info(struct)]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _MAY_BE_FLOAT):
            return True
        if isinstance(item, msgspec.Struct):  # a type, or a struct's field
            pending.extend(msgspec.structs.astuple(item))
        elif isinstance(item, tuple):
            pending.extend(item)
    return False


def _has_non_finite(value: object) -> bool:
    """Whether a NaN or an infinity is anywhere in `value` (which msgspec could encode)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, _SCALARS):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, msgspec.Struct):
            pending.extend(msgspec.structs.astuple(item))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            pending.extend(item)
        else:  # a dataclass, datetime, enum...: as msgspec sees it
            try:  # Raw is kept as it is (a leaf); to_builtins would refuse it
                builtin = msgspec.to_builtins(item, builtin_types=(msgspec.Raw,))
            except TypeError:  # a value only msgspec's encoder takes as it is
                continue
            if isinstance(builtin, float | dict | list):
                pending.append(builtin)
    return False
