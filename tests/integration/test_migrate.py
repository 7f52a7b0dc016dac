"""``migrate`` is safe to run from two places at once, and ``check_schema`` (what ``projector
run`` calls) refuses a schema that is behind, naming ``projector migrate``."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from projector.config import Config
from projector.runner.worker import load_handlers
from projector.store.connect import view_migrations
from projector.store.errors import SchemaBehind
from projector.store.migrate import ViewMigrations, check_schema, core_migrations, expected_version
from tests.conftest import ROOT, Services
from tests.integration.harness import (
    config_dict,
    make_config,
    migrate_all,
    projection,
    rows,
    write_config,
)

pytestmark = pytest.mark.integration

CORE_TABLES = [
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
]


def accounts_projection() -> list[dict[str, object]]:
    return [projection("accounts", ["accounts-migrate"], ["handlers.accounts"])]


def accounts_config(services: Services, pg_dsn: str) -> Config:
    return make_config(services, pg_dsn, accounts_projection())


def views_of(config: Config) -> list[ViewMigrations]:
    return [v for p in config.projections for v in view_migrations(p, load_handlers(p))]


def assert_migrated_once(pg_dsn: str) -> None:
    """Every table exists exactly once, the versions are current, and the store takes writes."""
    found = rows(
        pg_dsn,
        "select table_schema, table_name, count(*) from information_schema.tables"
        " where table_schema in ('projector', 'accounts') group by 1, 2 order by 1, 2",
    )
    assert found == [("accounts", "accounts", 1), *(("projector", t, 1) for t in CORE_TABLES)]
    assert rows(pg_dsn, "select id, version from projector.schema_version") == [
        (1, expected_version())
    ]
    assert rows(pg_dsn, "select projection, handler, version from projector.view_migrations") == [
        ("accounts", "handlers.accounts", 1)
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "insert into projector.checkpoints (projection, topic, partition, next_offset, epoch)"
            " values ('accounts', 'accounts-migrate', 0, 42, 1)"
        )
        conn.execute("insert into accounts.accounts values ('a', 'x', 0, 0, 0, 0, 1, 1)")
    assert rows(pg_dsn, "select next_offset from projector.checkpoints") == [(42,)]


@pytest.mark.parametrize("racers", [2, 4])
def test_concurrent_migrates_on_a_fresh_database_both_succeed(
    services: Services, pg_dsn: str, racers: int
) -> None:
    """Proves migrate() started at the same instant from several threads (each with its own
    connection) on a fresh database all succeed, one of them applies every migration and the
    others find nothing left to do, and the result is one copy of each table at the right
    schema_version, usable afterwards."""
    config = accounts_config(services, pg_dsn)
    barrier = threading.Barrier(racers)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def racer() -> None:
        try:
            barrier.wait(timeout=30)
            done = migrate_all(config)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(done)

    threads = [threading.Thread(target=racer, name=f"migrate-{i}") for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    assert errors == []
    assert len(results) == racers
    applied = sorted(results, key=len, reverse=True)
    assert applied[0] == [
        *(f"projector: applied {path.name}" for path in core_migrations()),
        "accounts: handlers.accounts migration 1",
    ]
    assert all(done == [] for done in applied[1:])
    assert_migrated_once(pg_dsn)


def test_concurrent_migrate_commands_from_two_processes_both_succeed(
    tmp_path: Path, services: Services, pg_dsn: str
) -> None:
    """Proves two `projector migrate` processes started together on a fresh database both
    exit 0 and leave one copy of each table at the right schema_version."""
    path = write_config(
        tmp_path / "projector.yaml", config_dict(services, pg_dsn, accounts_projection())
    )
    command = [sys.executable, "-m", "projector", "migrate", "-c", str(path)]
    procs = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted("schema up to date" in out for out in outputs) == [False, True], outputs
    assert_migrated_once(pg_dsn)


def test_migrate_twice_in_a_row_applies_nothing_the_second_time(
    services: Services, pg_dsn: str
) -> None:
    """Proves a second migrate() reports nothing done and keeps the schema as it was."""
    config = accounts_config(services, pg_dsn)
    assert len(migrate_all(config)) == len(core_migrations()) + 1
    assert migrate_all(config) == []
    assert_migrated_once(pg_dsn)


def test_check_schema_raises_on_a_fresh_database(services: Services, pg_dsn: str) -> None:
    """Proves check_schema on a database that was never migrated raises SchemaBehind naming
    `projector migrate`, and creates nothing."""
    config = accounts_config(services, pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(SchemaBehind, match="projector migrate") as info:
            check_schema(conn, "projector", views_of(config))
        assert "version 0" in str(info.value)
        # The connection is still usable: the failed probe left no aborted transaction.
        assert conn.execute("select 1").fetchone() == (1,)
    assert rows(pg_dsn, "select 1 from pg_namespace where nspname = 'projector'") == []


def test_check_schema_passes_after_migrate_and_catches_views_behind(
    services: Services, pg_dsn: str
) -> None:
    """Proves check_schema accepts a migrated database, and raises SchemaBehind naming
    `projector migrate` and the projection when a handler gains a migration not yet applied."""
    config = accounts_config(services, pg_dsn)
    migrate_all(config)
    views = views_of(config)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        check_schema(conn, "projector", views)
        newer = [
            ViewMigrations(
                v.projection,
                v.view_schema,
                v.handler,
                [*v.statements, "alter table accounts add column note text"],
            )
            for v in views
        ]
        with pytest.raises(SchemaBehind, match="projector migrate") as info:
            check_schema(conn, "projector", newer)
        assert "'accounts'" in str(info.value)
