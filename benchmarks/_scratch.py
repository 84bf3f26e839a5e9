"""What the single-purpose benchmark scripts share: their ``--dsn`` option and a
throw-away database to work in."""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import anyio
import psycopg
from psycopg import sql

import pgoutbox

ADMIN_DSN_ENV: Final = "PGOUTBOX_BENCH_DSN"
DEFAULT_ADMIN_DSN: Final = "host=127.0.0.1 user=postgres dbname=postgres"
DROP_TIMEOUT: Final = 30.0
"""Seconds the drop of the throw-away database may take, also after Ctrl-C."""


def add_dsn_option(parser: argparse.ArgumentParser) -> None:
    """``--dsn``: the admin connection string, from ``$PGOUTBOX_BENCH_DSN`` by default."""
    parser.add_argument(
        "--dsn",
        default=os.environ.get(ADMIN_DSN_ENV) or DEFAULT_ADMIN_DSN,
        help=f"admin connection string (default: ${ADMIN_DSN_ENV} or %(default)r); "
        "the script works in a database of its own, dropped at the end",
    )


@asynccontextmanager
async def throwaway_database(admin_dsn: str, prefix: str) -> AsyncIterator[str]:
    """Create a database named `prefix` and random hex, yield its connection
    string, and drop it ``WITH (FORCE)`` at the end, also on error or Ctrl-C."""
    name = f"{prefix}{secrets.token_hex(4)}"
    async with await pgoutbox.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(DROP_TIMEOUT):
                await admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
