"""A runtime role with row rights only, and a migrator role for DDL (migrate, rebuild)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from projector import scenarios
from projector.cli import app
from projector.config import parse_config
from projector.runner.rebuild import rebuild
from tests.conftest import Services
from tests.integration.harness import (
    config_dict,
    projection,
    publish,
    rows,
    run_until_caught_up,
    write_config,
)
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration


def as_role(dsn: str, role: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = role
    params.pop("password", None)
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture
def roles(pg_dsn: str) -> Iterator[tuple[str, str]]:
    """A migrator role that may create schemas in the test database, and a runtime role that
    may only log in; both dropped afterwards with what they own there."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "select rolsuper or rolcreaterole from pg_roles where rolname = current_user"
        ).fetchone()
        if not row or not row[0]:
            pytest.skip("the test role cannot create roles")
        tag = uuid.uuid4().hex[:8]
        migrator, runtime = f"migrator_{tag}", f"runtime_{tag}"
        conn.execute(f"create role {migrator} login")
        conn.execute(f"create role {runtime} login")
        dbname = conninfo_to_dict(pg_dsn)["dbname"]
        conn.execute(f'grant create on database "{dbname}" to {migrator}')
    yield migrator, runtime
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for role in (runtime, migrator):
            conn.execute(f"drop owned by {role} cascade")
        for role in (runtime, migrator):
            conn.execute(f"drop role {role}")


def test_the_daemon_runs_with_row_rights_only_and_ddl_is_the_migrators(
    services: Services,
    pg_dsn: str,
    roles: tuple[str, str],
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Proves the split of roles: ``projector migrate`` with ``migrate_dsn`` creates
    projector's tables and the views as the migrator and grants the daemon's role usage and
    row rights only; the daemon applies events as that role; that role is refused every kind
    of DDL (create, alter, drop, a new schema); ``projector rebuild`` (as the migrator) swaps
    the views in with the same grants, and the daemon goes on writing to the new tables."""
    migrator, runtime = roles
    rng = random.Random(14)
    log = scenarios.account_log(rng, accounts=30, events_per_account=10)
    topic = new_topic()
    publish(services.kafka, topic, log[:150])
    data = config_dict(
        services, as_role(pg_dsn, runtime), [projection("accounts", [topic], ["handlers.accounts"])]
    )
    data["postgres"]["migrate_dsn"] = as_role(pg_dsn, migrator)
    path = write_config(tmp_path / "projector.yaml", data)
    migrated = CliRunner().invoke(app, ["migrate", "-c", str(path)])
    assert migrated.exit_code == 0, migrated.output
    config = parse_config(data, env={})

    assert run_until_caught_up(config) == 0
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log[:150])

    with psycopg.connect(as_role(pg_dsn, runtime), autocommit=True) as conn:
        for ddl in (
            "create table projector.evil (x int)",
            "alter table projector.checkpoints add column evil int",
            "drop table accounts.accounts",
            "create schema evil",
            "truncate projector.checkpoints",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)
    owners = rows(
        pg_dsn,
        "select distinct tableowner from pg_tables where schemaname in ('projector', 'accounts')",
    )
    assert owners == [(migrator,)]

    assert rebuild(config, "accounts").status == "swapped"
    publish(services.kafka, topic, log[150:])
    assert run_until_caught_up(config) == 0
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
