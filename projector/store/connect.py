"""Which store a projection lives in, opened from the config, and checked before use.

``projector run`` and every command check first: PostgreSQL's schema must be current (else
``projector migrate``), Redis must persist and not evict projector's keys, and may not be a
cluster (see :mod:`projector.store.redis_checks`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from projector.apply import LoadedHandler
from projector.config import Config, ConfigError, ProjectionConfig
from projector.store.base import ProjectionFigures, Store
from projector.store.migrate import ViewMigrations, check_schema
from projector.store.postgres import PostgresStore
from projector.store.redis import RedisStore
from projector.store.redis_checks import check_server

log = logging.getLogger(__name__)


def open_store(config: Config, projection: ProjectionConfig) -> Store:
    """A new connection to the projection's store."""
    if projection.store == "redis":
        return _open_redis(config)
    return _open_postgres(config)


def _open_postgres(config: Config) -> PostgresStore:
    pg = config.postgres_config()
    return PostgresStore(
        pg.dsn.get_secret_value(), pg.schema_, pg.connect_timeout, pg.idle_in_transaction_timeout
    )


def _open_redis(config: Config) -> RedisStore:
    rc = config.redis_config()
    return RedisStore(rc.url.get_secret_value(), rc.prefix, rc.connect_timeout)


def view_migrations(
    projection: ProjectionConfig, handlers: Sequence[LoadedHandler]
) -> list[ViewMigrations]:
    return [
        ViewMigrations(projection.name, projection.schema_name, h.name, h.migrations)
        for h in handlers
    ]


class StoreSet:
    """One connection per kind of store, for code that serves several projections (the
    daemon's metrics, the commands): each projection is answered by its own store."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._open: dict[str, Store] = {}

    def of(self, projection: str | ProjectionConfig) -> Store:
        proj = (
            projection
            if isinstance(projection, ProjectionConfig)
            else self.config.projection(projection)
        )
        if proj.store not in self._open:
            self._open[proj.store] = open_store(self.config, proj)
        return self._open[proj.store]

    def figures(self, projections: Sequence[str], now: float) -> list[ProjectionFigures]:
        return [f for name in projections for f in self.of(name).projection_figures([name], now)]

    def check(
        self, projections: Sequence[ProjectionConfig], handlers: Sequence[Sequence[LoadedHandler]]
    ) -> None:
        """Refuse to go on with a store that is not ready (see the module docstring)."""
        views = [
            v
            for p, loaded in zip(projections, handlers, strict=True)
            if p.store == "postgres"
            for v in view_migrations(p, loaded)
        ]
        for p, loaded in zip(projections, handlers, strict=True):
            if p.store == "redis":
                for h in loaded:
                    if h.migrations:
                        raise ConfigError(
                            f"projection {p.name!r} keeps its views in Redis, but handler"
                            f" {h.name!r} has SQL MIGRATIONS: it is a PostgreSQL handler"
                        )
        if any(p.store == "postgres" for p in projections):
            pg = self.of(next(p for p in projections if p.store == "postgres"))
            assert isinstance(pg, PostgresStore)
            check_schema(pg.conn, pg.schema, views)
        if any(p.store == "redis" for p in projections):
            rs = self.of(next(p for p in projections if p.store == "redis"))
            assert isinstance(rs, RedisStore)
            for warning in check_server(rs.client, self.config.redis_config().disposable):
                log.warning("%s", warning)

    def close(self) -> None:
        for store in self._open.values():
            store.close()
        self._open.clear()
