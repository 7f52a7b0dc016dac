"""Fixtures of the integration tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from projector.config import Config, parse_config
from tests.conftest import Services
from tests.integration.harness import (
    config_dict,
    migrate_all,
    process_config,
    projection,
    write_config,
)
from tests.integration.redis_server import RedisServers
from tests.integration.views import PgViews, RedisViews, Views


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands and daemons run in-process install their own root log handler and level; put
    pytest's back afterwards so later tests log (and capture logs) normally."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServers]:
    """Private redis-servers for this test (``redis_servers.start(*args)``), stopped after."""
    servers = RedisServers(tmp_path / "redis")
    yield servers
    servers.close()


@dataclass
class StoreUnderTest:
    """The store a contract test runs against: its kind, the example handlers in its flavour,
    the config that selects it, and a reader of its views and of projector's own state."""

    kind: str
    services: Services
    pg_dsn: str
    redis_prefix: str
    views: Views

    def handler(self, example: str) -> str:
        """``handlers.customers`` or ``handlers.customers_redis``."""
        return f"handlers.{example}" if self.kind == "postgres" else f"handlers.{example}_redis"

    def projection(
        self, name: str, topics: Sequence[str], examples: Sequence[str], **extra: Any
    ) -> dict[str, Any]:
        return projection(
            name, topics, [self.handler(e) for e in examples], store=self.kind, **extra
        )

    def merge_projection(
        self, name: str, topics: Sequence[str], decoder: dict[str, Any], **merge: Any
    ) -> dict[str, Any]:
        """A merge-mode projection whose documents land in the store's document view: the
        built-in ``docs`` table (PostgreSQL) or ``handlers.profiles_redis`` (Redis)."""
        base: dict[str, Any] = {
            "name": name,
            "mode": "merge",
            "topics": list(topics),
            "decoder": decoder,
            "store": self.kind,
        }
        if self.kind == "postgres":
            return {**base, "merge": {"view_table": "docs", **merge}}
        return {**base, "merge": merge, "handlers": ["handlers.profiles_redis"]}

    def config_dict(self, projections: list[dict[str, Any]], **kafka: Any) -> dict[str, Any]:
        return config_dict(self.services, self.pg_dsn, projections, self.redis_prefix, **kafka)

    def process_config(self, tmp_path: Path, projections: list[dict[str, Any]]) -> Path:
        """A config file for ``projector run`` as a real process, PostgreSQL migrated."""
        return process_config(self.services, self.pg_dsn, tmp_path, projections, self.redis_prefix)

    def process_config_from(self, tmp_path: Path, data: dict[str, Any]) -> Path:
        """``data`` (a ``config_dict``, edited) as a config file, PostgreSQL migrated."""
        path = write_config(tmp_path / "config.yaml", data)
        migrate_all(parse_config(data, env={}))
        return path

    def config(self, projections: list[dict[str, Any]], **kafka: Any) -> Config:
        """The parsed config, PostgreSQL migrated when the projections live there."""
        config = parse_config(self.config_dict(projections, **kafka), env={})
        migrate_all(config)
        return config


@pytest.fixture(params=["postgres", "redis"])
def store(
    request: pytest.FixtureRequest, services: Services, pg_dsn: str, redis_prefix: str
) -> StoreUnderTest:
    """Each contract test runs once per store."""
    kind: str = request.param
    views: Views = (
        PgViews(pg_dsn) if kind == "postgres" else RedisViews(services.redis_url, redis_prefix)
    )
    return StoreUnderTest(kind, services, pg_dsn, redis_prefix, views)
