"""The named SQL statements and numbered migrations, loaded once per schema.

Statements live in ``pgoutbox/sql/queries.sql`` as ``-- name: <statement>``
blocks; migrations in ``pgoutbox/sql/migrations/NNNN_<name>.sql``. The only
template in them is ``{schema}``, filled with `psycopg.sql.Identifier`, so a
schema name can never inject SQL; every value is a bound parameter.

A block holding the line ``-- plan: per call`` is rendered as `PlannedPerCall`:
the store runs it unprepared, so PostgreSQL plans it for the table as it is at
each call rather than keeping a plan made while the table was empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources

from psycopg import sql

__all__ = ["Migration", "PlannedPerCall", "Statements", "load_migrations", "load_statements"]

_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_PER_CALL_LINE = re.compile(r"^-- plan: per call\s*$", re.MULTILINE)


class PlannedPerCall(bytes):
    """A rendered statement never to be prepared: rarely run, and a plan kept
    from an empty jobs table would scan the whole table once it has filled."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Statements:
    """Every named statement, rendered for one schema."""

    schema_version: bytes
    migration_lock: bytes
    migration_table_create: bytes
    migration_applied_list: bytes
    migration_record: bytes
    job_insert: bytes
    job_insert_notify: bytes
    job_insert_many: bytes
    job_insert_many_uniform: bytes
    job_claim: bytes
    job_release_claim: bytes
    fetch_session_start: bytes
    fetch_session_check_client: bytes
    fetch_sessions_ended: bytes
    job_set_outcome_many: bytes
    job_complete_many: bytes
    job_get: bytes
    worker_register: bytes
    worker_delete: bytes
    job_complete_fenced: bytes
    job_insert_unique: bytes
    job_cancel: bytes
    worker_heartbeat: bytes
    worker_rescue_expired: bytes
    job_prune: bytes
    jobs_vacuum_due: bytes
    status_queues: bytes
    status_workers: bytes
    job_count_unfinished: bytes


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered migration, rendered for one schema."""

    version: int
    name: str
    script: bytes


def _render(text: str, schema: str) -> bytes:
    # The files are package data we ship, not user input: treating them as
    # literal SQL templates is what they are for.
    template = sql.SQL(text)
    return template.format(schema=sql.Identifier(schema)).as_bytes(None)


@cache
def _statement_texts() -> dict[str, str]:
    text = resources.files("pgoutbox.sql").joinpath("queries.sql").read_text("utf-8")
    parts = _NAME_LINE.split(text)
    texts = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    expected = {f.name for f in fields(Statements)}
    if set(texts) != expected:
        raise RuntimeError(
            f"queries.sql does not match Statements: {sorted(set(texts) ^ expected)}"
        )
    return texts


@cache
def load_statements(schema: str) -> Statements:
    """Every named statement rendered for `schema` (cached per schema)."""
    rendered: dict[str, bytes] = {}
    for name, text in _statement_texts().items():
        query = _render(text, schema)
        rendered[name] = PlannedPerCall(query) if _PER_CALL_LINE.search(text) else query
    return Statements(**rendered)


@cache
def load_migrations(schema: str) -> tuple[Migration, ...]:
    """The numbered migrations in order, rendered for `schema` (cached per schema)."""
    found: list[Migration] = []
    for entry in resources.files("pgoutbox.sql.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            script = _render(entry.read_text("utf-8"), schema)
            found.append(Migration(int(match[1]), match[2], script))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return tuple(found)
