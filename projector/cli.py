"""projector: build read models in PostgreSQL from Kafka event streams, in order, exactly once.

Each command wraps one function that does the work. Exit codes: 0 ok, 1 failure, 2 bad
configuration (the message names the key), 3 database schema behind (run `projector migrate`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from projector.config import Config, ConfigError, ProjectionConfig, load_config, redact
from projector.logs import setup_logging
from projector.runner.daemon import run as run_daemon
from projector.runner.dead_letters import resolve
from projector.runner.worker import build_decoders, check_supported, load_handlers, view_migrations
from projector.store.errors import SchemaBehind, StoreError
from projector.store.migrate import check_schema
from projector.store.migrate import migrate as do_migrate
from projector.store.postgres import PostgresStore, list_dead_letters, purge_dead_letters

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
dead_letters_app = typer.Typer(
    no_args_is_help=True, help="List, retry, skip and purge dead letters."
)
app.add_typer(dead_letters_app, name="dead-letters")

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="PROJECTOR_CONFIG", help="The YAML config file."),
]
ProjectionOpt = Annotated[str, typer.Option("--projection", "-p", help="The projection's name.")]
T = TypeVar("T")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _guard(fn: Callable[[], T]) -> T:
    """Turn the errors a person can act on into one clear line and a non-zero exit."""
    try:
        return fn()
    except SchemaBehind as exc:
        raise _fail(str(exc), 3) from None
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except StoreError as exc:
        raise _fail(str(exc), 1) from None


def _with_store(cfg: Config, work: Callable[[PostgresStore], T]) -> T:
    """Run ``work`` on a store whose schema is current (else SchemaBehind names migrate)."""
    store = PostgresStore(cfg.postgres.dsn.get_secret_value(), cfg.postgres.schema_)
    try:
        check_schema(store.conn, cfg.postgres.schema_, [])
        return work(store)
    finally:
        store.close()


def _setup_logging(config: Config) -> None:
    setup_logging(config.log.level, config.log.format)


def _check_projection(projection: ProjectionConfig) -> None:
    check_supported(projection)
    load_handlers(projection)
    build_decoders(projection)


@app.command("check-config")
def check_config(config: ConfigOpt = Path("projector.yaml")) -> None:
    """Validate the config, import every handler and decoder, and print a summary."""
    cfg = _config(config)
    for p in cfg.projections:
        _guard(lambda p=p: _check_projection(p))  # type: ignore[misc]
        typer.echo(
            f"projection {p.name}: mode {p.mode}, topics {', '.join(p.topics)},"
            f" views in schema {p.schema_name}, handlers {', '.join(p.handlers)}"
        )
    typer.echo(
        f"postgres: {redact(cfg.postgres.dsn.get_secret_value())} (schema {cfg.postgres.schema_})"
    )
    typer.echo(
        f"kafka: {cfg.kafka.bootstrap_servers} (groups {cfg.kafka.group_prefix}.<projection>)"
    )
    typer.echo("config OK")


@app.command()
def migrate(config: ConfigOpt = Path("projector.yaml")) -> None:
    """Create or upgrade projector's tables and every projection's views. Safe to run from two
    places at once."""
    cfg = _config(config)
    _setup_logging(cfg)

    def work() -> list[str]:
        views = [v for p in cfg.projections for v in view_migrations(p, load_handlers(p))]
        return do_migrate(
            cfg.postgres.dsn.get_secret_value(),
            cfg.postgres.schema_,
            views,
            cfg.postgres.connect_timeout,
        )

    done = _guard(work)
    for line in done:
        typer.echo(line)
    typer.echo("schema up to date" if not done else f"{len(done)} migration(s) applied")


@app.command()
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


@dead_letters_app.command("list")
def dead_letters_list(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[str | None, typer.Option("--projection", "-p")] = None,
    status: Annotated[
        str | None, typer.Option(help="open, retried or skipped; all when unset.")
    ] = "open",
    limit: int = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List dead letters with their reason and source offset."""
    cfg = _config(config)
    rows = _guard(
        lambda: _with_store(cfg, lambda s: list_dead_letters(s, projection, status, limit))
    )
    items: list[dict[str, Any]] = []
    for r in rows:
        src = r.message.source if r.message is not None else (r.event.source if r.event else None)
        items.append(
            {
                "id": r.id,
                "projection": r.projection,
                "kind": r.kind,
                "status": r.status,
                "stream": r.stream,
                "seq": r.seq,
                "source": None if src is None else f"{src.topic}[{src.partition}]@{src.offset}",
                "attempts": r.attempts,
                "created_at": r.created_at.isoformat(),
                "reason": r.reason,
            }
        )
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for i in items:
        where = f"{i['stream']} seq {i['seq']}" if i["stream"] else "(undecoded)"
        typer.echo(
            f"#{i['id']} {i['projection']} {i['kind']} {i['status']} {where} from {i['source']}: {i['reason']}"
        )
    typer.echo(f"{len(items)} dead letter(s)")


def _resolve(config: Path, projection: str, ids: list[int], action: str) -> None:
    cfg = _config(config)
    _setup_logging(cfg)
    outcomes = _guard(lambda: resolve(cfg, projection, ids, action, time.time))
    for o in outcomes:
        typer.echo(f"#{o.id}: {o.status}: {o.detail}")
    failed = [o for o in outcomes if o.status not in ("retried", "skipped")]
    raise typer.Exit(1 if failed else 0)


@dead_letters_app.command("retry")
def dead_letters_retry(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see list).")],
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
) -> None:
    """Apply dead letters again after a fix; their streams resume and drain."""
    _resolve(config, projection, ids, "retry")


@dead_letters_app.command("skip")
def dead_letters_skip(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see list).")],
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
) -> None:
    """Move past dead letters without applying them; their streams resume and drain."""
    _resolve(config, projection, ids, "skip")


@dead_letters_app.command("purge")
def dead_letters_purge(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[str | None, typer.Option("--projection", "-p")] = None,
    include_open: Annotated[
        bool,
        typer.Option("--include-open", help="Also delete open ones (they block their streams)."),
    ] = False,
) -> None:
    """Delete resolved (retried or skipped) dead letters."""
    cfg = _config(config)
    count = _guard(
        lambda: _with_store(cfg, lambda s: purge_dead_letters(s, projection, include_open))
    )
    typer.echo(f"purged {count} dead letter(s)")


def main() -> None:
    app(prog_name="projector")


if __name__ == "__main__":
    main()
