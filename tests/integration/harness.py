"""Helpers for tests that run projector against the real services: configs, publishing wire
events, running the daemon (in-process or as a real process), reading views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import yaml
from confluent_kafka import Producer

from projector.config import Config, parse_config
from projector.runner.daemon import run
from projector.runner.worker import load_handlers
from projector.store.connect import view_migrations
from projector.store.migrate import migrate
from tests.conftest import ROOT, Services, unique

WIRE_DECODER = {
    "kind": "json",
    "stream": "stream",
    "seq": "seq",
    "ts": "ts",
    "type": "type",
    "data": "data",
}


def projection(
    name: str, topics: Sequence[str], handlers: Sequence[str], **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "topics": list(topics),
        "handlers": list(handlers),
        "decoder": WIRE_DECODER,
        **extra,
    }


def config_dict(
    services: Services,
    pg_dsn: str,
    projections: list[dict[str, Any]],
    redis_prefix: str | None = None,
    **kafka: Any,
) -> dict[str, Any]:
    """A config for the test's services; with ``redis_prefix``, a redis section too (for
    projections with ``store: redis``)."""
    redis = (
        {}
        if redis_prefix is None
        else {"redis": {"url": services.redis_url, "prefix": redis_prefix}}
    )
    return {
        **redis,
        "kafka": {
            "bootstrap_servers": services.kafka,
            "group_prefix": unique("g"),
            # Short session: a test that kills an instance without restarting it still finishes.
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
            **kafka,
        },
        "postgres": {"dsn": pg_dsn},
        "metrics": {"enabled": False},
        "projections": projections,
    }


def make_config(
    services: Services,
    pg_dsn: str,
    projections: list[dict[str, Any]],
    redis_prefix: str | None = None,
    **kafka: Any,
) -> Config:
    return parse_config(config_dict(services, pg_dsn, projections, redis_prefix, **kafka), env={})


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def process_config(
    services: Services,
    pg_dsn: str,
    tmp_path: Path,
    projections: list[dict[str, Any]],
    redis_prefix: str | None = None,
) -> Path:
    """A config file for ``projector run`` as a real process, its schema migrated."""
    data = config_dict(services, pg_dsn, projections, redis_prefix)
    path = write_config(tmp_path / "config.yaml", data)
    migrate_all(parse_config(data, env={}))
    return path


def migrate_all(config: Config) -> list[str]:
    on_pg = [p for p in config.projections if p.store == "postgres"]
    views = [v for p in on_pg for v in view_migrations(p, load_handlers(p))]
    pg = config.postgres_config()
    return migrate(pg.dsn.get_secret_value(), pg.schema_, views)


def publish(
    bootstrap: str,
    topic: str,
    items: Iterable[dict[str, Any] | bytes | None],
    key_of: str = "stream",
) -> int:
    """Publish in the given order; dict items are JSON keyed by their stream (one stream, one
    partition); bytes and None (a tombstone) go as they are, keyed ``raw``."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    count = 0
    for item in items:
        if isinstance(item, dict):
            key = str(item.get(key_of, "")).encode()
            producer.produce(topic, value=json.dumps(item).encode(), key=key)
        else:
            producer.produce(topic, value=item, key=b"raw")
        count += 1
        if count % 10_000 == 0:
            producer.flush(30)
        producer.poll(0)
    assert producer.flush(60) == 0
    return count


def run_until_caught_up(config: Config) -> int:
    return run(config, exit_when_caught_up=True)


def daemon_process(
    config_path: Path, *args: str, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``projector run`` as a real process (for kill -9 tests); its output is appended to
    ``log`` (default: beside the config). ``env`` is added to this process's environment."""
    log = log or config_path.with_suffix(".log")
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "projector", "run", "-c", str(config_path), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def rows(pg_dsn: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(query, params).fetchall()
