"""check-config, migrate and run: configure, set up and run the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from projector.cli.common import (
    ConfigOpt,
    _config,
    _guard,
    _setup_logging,
)
from projector.config import ProjectionConfig, redact
from projector.runner.daemon import run as run_daemon
from projector.runner.worker import build_decoders, load_handlers
from projector.store.connect import view_migrations
from projector.store.migrate import migrate as do_migrate
from projector.store.migrate import role_of


def _check_projection(projection: ProjectionConfig) -> None:
    load_handlers(projection)
    build_decoders(projection)


def check_config(config: ConfigOpt = Path("projector.yaml")) -> None:
    """Validate the config, import every handler and decoder, and print a summary."""
    cfg = _config(config)
    for p in cfg.projections:
        _guard(lambda p=p: _check_projection(p))  # type: ignore[misc]
        where = "schema" if p.store == "postgres" else "Redis namespace"
        typer.echo(
            f"projection {p.name}: mode {p.mode}, store {p.store}, topics {', '.join(p.topics)},"
            f" views in {where} {p.schema_name}, handlers {', '.join(p.handlers)}"
        )
    if cfg.postgres is not None:
        pg = cfg.postgres
        typer.echo(f"postgres: {redact(pg.dsn.get_secret_value())} (schema {pg.schema_})")
    if cfg.redis is not None:
        typer.echo(f"redis: {redact(cfg.redis.url.get_secret_value())} (prefix {cfg.redis.prefix})")
    typer.echo(
        f"kafka: {cfg.kafka.bootstrap_servers} (groups {cfg.kafka.group_prefix}.<projection>)"
    )
    typer.echo("config OK")


def migrate(config: ConfigOpt = Path("projector.yaml")) -> None:
    """Create or upgrade projector's tables and every projection's views. Safe to run from two
    places at once."""
    cfg = _config(config)
    _setup_logging(cfg)

    def work() -> list[str]:
        # Redis needs no migration: its keys are made as batches write them.
        on_pg = [p for p in cfg.projections if p.store == "postgres"]
        if not on_pg and cfg.postgres is None:
            return []
        pg = cfg.postgres_config()
        views = [v for p in on_pg for v in view_migrations(p, load_handlers(p))]
        runtime = None
        if pg.migrate_dsn is not None:
            runtime = role_of(pg.dsn.get_secret_value(), pg.connect_timeout)
        return do_migrate(pg.migrator_dsn, pg.schema_, views, pg.connect_timeout, runtime)

    done = _guard(work)
    for line in done:
        typer.echo(line)
    typer.echo("schema up to date" if not done else f"{len(done)} migration(s) applied")


def run(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[
        list[str] | None, typer.Option("--projection", "-p", help="Run only these projections.")
    ] = None,
    exit_when_caught_up: Annotated[
        bool,
        typer.Option(
            "--exit-when-caught-up",
            help="Exit once every partition is caught up (demo, tests, backfills).",
        ),
    ] = False,
) -> None:
    """Run the daemon: consume, sequence, apply, until SIGTERM."""
    cfg = _config(config)
    _setup_logging(cfg)
    if projection:
        for name in projection:
            _guard(lambda name=name: cfg.projection(name))  # type: ignore[misc]
    code = _guard(lambda: run_daemon(cfg, projection, exit_when_caught_up))
    raise typer.Exit(code)
