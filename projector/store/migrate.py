"""``projector migrate``: projector's own tables (``migrations/*.sql``) and the handlers' view
migrations. Safe to run from two places at once: everything happens under one advisory lock,
and each step is recorded in the same transaction that applies it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from projector.store.errors import SchemaBehind, StoreUnavailable

log = logging.getLogger(__name__)

_LOCK_KEY = 0x70726F6A  # "proj": one advisory lock for every migrate of every schema
_PATTERN = "[0-9][0-9][0-9][0-9]_*.sql"


def _migrations_dir() -> Path:
    """A source checkout's migrations/ (editable installs too), else the installed copy."""
    candidates = [
        Path(__file__).resolve().parent.parent.parent / "migrations",
        Path(sys.prefix) / "share" / "projector" / "migrations",
    ]
    for candidate in candidates:
        if any(candidate.glob(_PATTERN)):
            return candidate
    raise RuntimeError(
        f"projector's SQL migrations are missing; looked in {[str(c) for c in candidates]}"
    )


MIGRATIONS_DIR = _migrations_dir()


def core_migrations() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob(_PATTERN))


def expected_version() -> int:
    return len(core_migrations())


@dataclass(frozen=True)
class ViewMigrations:
    """A projection's handler and its DDL, applied in its view schema."""

    projection: str
    view_schema: str
    handler: str
    statements: Sequence[str]


def _connect(dsn: str, connect_timeout: float) -> psycopg.Connection[tuple[Any, ...]]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc


def role_of(dsn: str, connect_timeout: float = 10.0) -> str:
    """The role a DSN logs in as."""
    with _connect(dsn, connect_timeout) as conn:
        row = conn.execute("select current_user").fetchone()
    assert row is not None
    return str(row[0])


def migrate(
    dsn: str,
    schema: str,
    views: Sequence[ViewMigrations],
    connect_timeout: float = 10.0,
    runtime_role: str | None = None,
) -> list[str]:
    """Bring the schema and every projection's views up to date; returns what was done. With
    ``runtime_role`` (the daemon's, when it is not this migrator role), grant it row rights
    and nothing more on projector's tables and the views: it can't create, alter or drop."""
    done: list[str] = []
    with _connect(dsn, connect_timeout) as conn, conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(
            "select set_config('search_path', %s, true)", (sql.Identifier(schema).as_string(conn),)
        )
        conn.execute(
            "create table if not exists schema_version"
            " (id int primary key default 1 check (id = 1), version int not null)"
        )
        row = conn.execute("select version from schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        for number, path in enumerate(core_migrations(), start=1):
            if number > current:
                conn.execute(sql.SQL(path.read_text()))
                done.append(f"{schema}: applied {path.name}")
        conn.execute(
            "insert into schema_version (id, version) values (1, %s)"
            " on conflict (id) do update set version = excluded.version",
            (max(current, expected_version()),),
        )
        for v in views:
            done += _migrate_views(conn, schema, v)
        user = conn.execute("select current_user").fetchone()
        if runtime_role and user is not None and runtime_role != user[0]:
            for name in dict.fromkeys([schema, *(v.view_schema for v in views)]):
                _grant_rows(conn, name, runtime_role)
    return done


def _grant_rows(conn: psycopg.Connection[tuple[Any, ...]], schema: str, role: str) -> None:
    """Usage of ``schema`` and row rights on its tables and sequences, now and for the tables
    later migrations create (migrate runs again then and grants again, too)."""
    s, r = sql.Identifier(schema), sql.Identifier(role)
    for statement in (
        "grant usage on schema {s} to {r}",
        "grant select, insert, update, delete on all tables in schema {s} to {r}",
        "grant usage, select on all sequences in schema {s} to {r}",
        "alter default privileges in schema {s} grant select, insert, update, delete on tables to {r}",
        "alter default privileges in schema {s} grant usage, select on sequences to {r}",
    ):
        conn.execute(sql.SQL(statement).format(s=s, r=r))


def _migrate_views(
    conn: psycopg.Connection[tuple[Any, ...]], schema: str, v: ViewMigrations
) -> list[str]:
    done: list[str] = []
    row = conn.execute(
        sql.SQL(
            "select version from {}.view_migrations where projection = %s and handler = %s"
        ).format(sql.Identifier(schema)),
        (v.projection, v.handler),
    ).fetchone()
    current = 0 if row is None else int(row[0])
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(v.view_schema)))
    conn.execute(
        "select set_config('search_path', %s, true)",
        (sql.Identifier(v.view_schema).as_string(conn),),
    )
    for number, statement in enumerate(v.statements, start=1):
        if number > current:
            conn.execute(sql.SQL(statement))
            done.append(f"{v.view_schema}: {v.handler} migration {number}")
    if len(v.statements) > current or row is None:
        conn.execute(
            sql.SQL(
                "insert into {}.view_migrations (projection, handler, version) values (%s, %s, %s)"
                " on conflict (projection, handler) do update set version = excluded.version,"
                " applied_at = now()"
            ).format(sql.Identifier(schema)),
            (v.projection, v.handler, max(current, len(v.statements))),
        )
    conn.execute(
        "select set_config('search_path', %s, true)", (sql.Identifier(schema).as_string(conn),)
    )
    return done


def check_schema(
    conn: psycopg.Connection[tuple[Any, ...]], schema: str, views: Sequence[ViewMigrations]
) -> None:
    """Raise :class:`SchemaBehind`, naming ``projector migrate``, unless everything is current.
    ``projector run`` never changes the schema itself."""
    q = sql.SQL("select version from {}.schema_version").format(sql.Identifier(schema))
    try:
        with conn.transaction():
            row = conn.execute(q).fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    have = 0 if row is None else int(row[0])
    if have < expected_version():
        raise SchemaBehind(
            f"the database schema {schema!r} is at version {have}, this projector needs"
            f" {expected_version()}: run `projector migrate` first"
        )
    if have > expected_version():
        raise SchemaBehind(
            f"the database schema {schema!r} is at version {have}, newer than this projector"
            f" ({expected_version()}): upgrade projector"
        )
    for v in views:
        got = conn.execute(
            sql.SQL(
                "select version from {}.view_migrations where projection = %s and handler = %s"
            ).format(sql.Identifier(schema)),
            (v.projection, v.handler),
        ).fetchone()
        if (0 if got is None else int(got[0])) < len(v.statements):
            raise SchemaBehind(
                f"the views of projection {v.projection!r} ({v.handler}) are behind:"
                " run `projector migrate` first"
            )
