"""What every command shares: the config option, errors for people (one line, an exit code,
no traceback), a store whose schema is current, durations for humans."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from confluent_kafka import KafkaException

from projector.config import Config, ConfigError, load_config
from projector.logs import setup_logging
from projector.store.connect import StoreSet
from projector.store.errors import SchemaBehind, StoreError

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
    except KafkaException as exc:
        raise _fail(f"Kafka: {exc}", 1) from None


def _with_stores(cfg: Config, work: Callable[[StoreSet], T]) -> T:
    """Run ``work`` with the projections' stores, checked first (a PostgreSQL schema that is
    behind raises SchemaBehind naming migrate; an unfit Redis is refused)."""
    stores = StoreSet(cfg)
    try:
        stores.check(cfg.projections, [[] for _ in cfg.projections])
        return work(stores)
    finally:
        stores.close()


def _setup_logging(config: Config) -> None:
    setup_logging(config.log.level, config.log.format)


def _human(seconds: float) -> str:
    """A duration as people read it: 42s, 3m12s, 2h05m, 3d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()
