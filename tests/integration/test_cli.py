"""The ``projector`` command against a real PostgreSQL: check-config, migrate, run's refusal of
a schema that is behind, and the dead-letters list and purge commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner, Result

from projector.cli import app
from projector.store.connect import StoreSet
from projector.store.migrate import expected_version
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration.harness import config_dict, projection, rows, write_config

pytestmark = pytest.mark.integration

CORE_TABLES = {
    "checkpoints",
    "correlations",
    "dead_letters",
    "documents",
    "gaps",
    "holding",
    "outbox",
    "positions",
    "rebuilds",
    "schema_version",
    "view_migrations",
}


def accounts_config(services: Services, pg_dsn: str, **extra: Any) -> dict[str, Any]:
    """One projection ``accounts`` (handlers.accounts, views in schema ``accounts``). Its topic
    is never read by these tests, so it need not exist."""
    return config_dict(
        services, pg_dsn, [projection("accounts", ["accounts-cli"], ["handlers.accounts"], **extra)]
    )


@pytest.fixture
def config_path(tmp_path: Path, services: Services, pg_dsn: str) -> Path:
    return write_config(tmp_path / "projector.yaml", accounts_config(services, pg_dsn))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_clean_exit(result: Result, code: int) -> None:
    """Exited with ``code`` through typer.Exit/SystemExit, not an uncaught exception."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output


def tables(pg_dsn: str, *schemas: str) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in rows(
            pg_dsn,
            "select table_schema, table_name from information_schema.tables"
            " where table_schema = any(%s) order by 1, 2",
            (list(schemas),),
        )
    ]


def schema_exists(pg_dsn: str, schema: str) -> bool:
    return bool(rows(pg_dsn, "select 1 from pg_namespace where nspname = %s", (schema,)))


# --- check-config -----------------------------------------------------------------------------


def test_check_config_accepts_a_good_config(config_path: Path) -> None:
    """Proves check-config on a valid config imports the handlers and decoders, prints a
    summary of each projection and "config OK", and exits 0."""
    result = invoke("check-config", "-c", str(config_path))
    assert_clean_exit(result, 0)
    assert (
        "projection accounts: mode sequence, store postgres, topics accounts-cli" in result.stdout
    )
    assert "views in schema accounts" in result.stdout
    assert "handlers handlers.accounts" in result.stdout
    assert result.stdout.rstrip().endswith("config OK")


def test_check_config_prints_the_dsn_redacted(
    tmp_path: Path, services: Services, pg_dsn: str
) -> None:
    """Proves check-config shows where the store is without the DSN's password."""
    data = accounts_config(services, pg_dsn)
    data["postgres"]["dsn"] = "postgresql://app:hunter2-secret@db.internal:5432/app"
    path = write_config(tmp_path / "projector.yaml", data)
    result = invoke("check-config", "-c", str(path))
    assert_clean_exit(result, 0)
    assert "postgresql://app:***@db.internal:5432/app" in result.stdout
    assert "hunter2" not in result.output


def test_check_config_rejects_a_bad_config_naming_the_key(
    tmp_path: Path, services: Services, pg_dsn: str
) -> None:
    """Proves check-config on an invalid config exits 2 with the file and the key named on
    stderr, prints no "config OK" and no traceback."""
    path = write_config(
        tmp_path / "projector.yaml", accounts_config(services, pg_dsn, max_seq_jump=-1)
    )
    result = invoke("check-config", "-c", str(path))
    assert_clean_exit(result, 2)
    assert "projections[0].max_seq_jump" in result.stderr
    assert str(path) in result.stderr
    assert "config OK" not in result.output


def test_check_config_rejects_a_missing_file(tmp_path: Path) -> None:
    """Proves check-config on a file that does not exist exits 2 naming the path."""
    path = tmp_path / "absent.yaml"
    result = invoke("check-config", "-c", str(path))
    assert_clean_exit(result, 2)
    assert str(path) in result.stderr


def test_check_config_rejects_a_handler_module_that_does_not_exist(
    tmp_path: Path, services: Services, pg_dsn: str
) -> None:
    """Proves a handler path of the right shape whose module cannot be imported passes the
    parse but fails check-config with a non-zero exit and a message naming the module."""
    data = accounts_config(services, pg_dsn)
    data["projections"][0]["handlers"] = ["handlers.does_not_exist"]
    path = write_config(tmp_path / "projector.yaml", data)
    result = invoke("check-config", "-c", str(path))
    assert_clean_exit(result, 2)
    assert "handlers.does_not_exist" in result.stderr
    assert "cannot be imported" in result.stderr
    assert "config OK" not in result.output


def test_check_config_rejects_a_handler_without_the_named_function(
    tmp_path: Path, services: Services, pg_dsn: str
) -> None:
    """Proves ``module:function`` naming a function the module lacks fails check-config
    with a message naming it."""
    data = accounts_config(services, pg_dsn)
    data["projections"][0]["handlers"] = ["handlers.accounts:no_such_function"]
    path = write_config(tmp_path / "projector.yaml", data)
    result = invoke("check-config", "-c", str(path))
    assert_clean_exit(result, 2)
    assert "no_such_function" in result.stderr


# --- migrate ----------------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_a_second_run_changes_nothing(
    config_path: Path, pg_dsn: str
) -> None:
    """Proves migrate creates projector's tables and the accounts handler's view table in the
    projection's schema, records both versions, and that a second migrate reports the schema
    up to date and leaves tables, versions and data as they were."""
    assert not schema_exists(pg_dsn, "projector")

    first = invoke("migrate", "-c", str(config_path))
    assert_clean_exit(first, 0)
    assert "projector: applied 0001_core.sql" in first.stdout
    assert "accounts: handlers.accounts migration 1" in first.stdout
    assert f"{expected_version() + 1} migration(s) applied" in first.stdout

    expected = sorted([("accounts", "accounts"), *(("projector", t) for t in CORE_TABLES)])
    assert tables(pg_dsn, "projector", "accounts") == expected
    assert rows(pg_dsn, "select id, version from projector.schema_version") == [
        (1, expected_version())
    ]
    versions = "select projection, handler, version from projector.view_migrations"
    assert rows(pg_dsn, versions) == [("accounts", "handlers.accounts", 1)]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("insert into accounts.accounts values ('a', 'x', 1, 1, 0, 0, 1, 1)")

    second = invoke("migrate", "-c", str(config_path))
    assert_clean_exit(second, 0)
    assert second.stdout.strip() == "schema up to date"
    assert tables(pg_dsn, "projector", "accounts") == expected
    assert rows(pg_dsn, "select version from projector.schema_version") == [(expected_version(),)]
    assert rows(pg_dsn, versions) == [("accounts", "handlers.accounts", 1)]
    assert rows(pg_dsn, "select id, balance from accounts.accounts") == [("a", 1)]


def test_a_second_migrate_keeps_view_migrations_applied_at(config_path: Path, pg_dsn: str) -> None:
    """Proves a no-op migrate does not rewrite view_migrations.applied_at: it keeps saying
    when the handler's migrations were actually applied."""
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)
    query = "select projection, handler, version, applied_at from projector.view_migrations"
    before = rows(pg_dsn, query)
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)
    assert rows(pg_dsn, query) == before


def test_migrate_reports_an_unreachable_database_without_a_traceback(
    tmp_path: Path, services: Services
) -> None:
    """Proves migrate against a database that cannot be reached exits non-zero with one clear
    line (as run and dead-letters do), not a traceback."""
    data = accounts_config(services, "postgresql://projector@127.0.0.1:1/nothing")
    data["postgres"]["connect_timeout"] = "1s"
    path = write_config(tmp_path / "projector.yaml", data)
    result = invoke("migrate", "-c", str(path))
    assert_clean_exit(result, 1)
    assert "cannot connect" in result.stderr


# --- run refuses a schema that is behind ------------------------------------------------------


def test_run_refuses_a_database_that_was_never_migrated(config_path: Path, pg_dsn: str) -> None:
    """Proves run on a fresh database exits 3 with a message naming `projector migrate`, and
    creates nothing: neither projector's schema nor the view schema exists afterwards."""
    result = invoke("run", "-c", str(config_path), "--exit-when-caught-up")
    assert_clean_exit(result, 3)
    assert "projector migrate" in result.stderr
    assert not schema_exists(pg_dsn, "projector")
    assert not schema_exists(pg_dsn, "accounts")


def test_run_refuses_when_a_handler_migration_is_not_applied(
    config_path: Path, pg_dsn: str
) -> None:
    """Proves run exits 3 naming `projector migrate` and the projection when projector's own
    schema is current but a handler's view migration is not recorded as applied, and that it
    does not apply it itself."""
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("delete from projector.view_migrations where projection = 'accounts'")

    result = invoke("run", "-c", str(config_path), "--exit-when-caught-up")
    assert_clean_exit(result, 3)
    assert "projector migrate" in result.stderr
    assert "'accounts'" in result.stderr
    assert rows(pg_dsn, "select count(*) from projector.view_migrations") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.checkpoints") == [(0,)]


def test_run_refuses_a_database_newer_than_this_projector(config_path: Path, pg_dsn: str) -> None:
    """Proves run exits 3 asking to upgrade projector when the schema is ahead of it."""
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("update projector.schema_version set version = version + 1")
    result = invoke("run", "-c", str(config_path), "--exit-when-caught-up")
    assert_clean_exit(result, 3)
    assert "upgrade projector" in result.stderr


# --- dead-letters -----------------------------------------------------------------------------


def add_dead_letters(pg_dsn: str, *statuses: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for i, status in enumerate(statuses):
            conn.execute(
                "insert into projector.dead_letters (projection, kind, reason, stream, seq,"
                ' topic, partition, "offset", status) values'
                " ('accounts', 'handler', 'boom', 'account:1', %s, 'accounts-cli', 0, %s, %s)",
                (i + 1, 40 + i, status),
            )


def test_dead_letters_list_on_an_empty_store(config_path: Path) -> None:
    """Proves dead-letters list on a migrated store without dead letters prints
    "0 dead letter(s)", and with --json prints an empty JSON list."""
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)

    result = invoke("dead-letters", "list", "-c", str(config_path))
    assert_clean_exit(result, 0)
    assert result.stdout.strip() == "0 dead letter(s)"

    result = invoke("dead-letters", "list", "-c", str(config_path), "--json")
    assert_clean_exit(result, 0)
    assert json.loads(result.stdout) == []
    assert result.stdout.strip() == "[]"


def test_dead_letters_list_shows_source_and_reason(config_path: Path, pg_dsn: str) -> None:
    """Proves dead-letters list shows open dead letters (only them by default) with their
    stream, seq, source offset and reason, in text and JSON."""
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)
    add_dead_letters(pg_dsn, "open", "skipped")

    result = invoke("dead-letters", "list", "-c", str(config_path))
    assert_clean_exit(result, 0)
    assert "account:1 seq 1 from accounts-cli[0]@40: boom" in result.stdout
    assert "1 dead letter(s)" in result.stdout

    result = invoke("dead-letters", "list", "-c", str(config_path), "--json")
    assert_clean_exit(result, 0)
    (item,) = json.loads(result.stdout)
    assert item["projection"] == "accounts"
    assert (item["stream"], item["seq"], item["status"]) == ("account:1", 1, "open")
    assert item["source"] == "accounts-cli[0]@40"
    assert item["reason"] == "boom"


def test_dead_letters_purge_prints_the_count(config_path: Path, pg_dsn: str) -> None:
    """Proves dead-letters purge deletes the resolved dead letters and prints how many, keeps
    open ones unless --include-open, and prints 0 when there is nothing to purge."""
    assert_clean_exit(invoke("migrate", "-c", str(config_path)), 0)

    result = invoke("dead-letters", "purge", "-c", str(config_path))
    assert_clean_exit(result, 0)
    assert result.stdout.strip() == "purged 0 dead letter(s)"

    add_dead_letters(pg_dsn, "retried", "skipped", "open")
    result = invoke("dead-letters", "purge", "-c", str(config_path))
    assert_clean_exit(result, 0)
    assert result.stdout.strip() == "purged 2 dead letter(s)"
    assert rows(pg_dsn, "select status from projector.dead_letters") == [("open",)]

    result = invoke("dead-letters", "purge", "-c", str(config_path), "--include-open")
    assert_clean_exit(result, 0)
    assert result.stdout.strip() == "purged 1 dead letter(s)"
    assert rows(pg_dsn, "select count(*) from projector.dead_letters") == [(0,)]


def test_dead_letters_list_on_a_database_never_migrated(config_path: Path) -> None:
    """Proves dead-letters list on a fresh database exits non-zero with a message naming
    `projector migrate`, not a traceback."""
    result = invoke("dead-letters", "list", "-c", str(config_path))
    try:
        assert result.exit_code != 0
        assert_clean_exit(result, result.exit_code)
        assert "projector migrate" in result.stderr
    finally:
        close_leaked_stores(result)


def close_leaked_stores(result: Result) -> None:
    """Close the connection of any PostgresStore left open in the frames of the exception the
    command raised (``dead-letters list`` closes its store only on success), so its
    ResourceWarning does not surface later as an unraisable-exception error."""
    tb = result.exc_info[2] if result.exc_info else None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, PostgresStore | StoreSet):
                value.close()
        tb = tb.tb_next
