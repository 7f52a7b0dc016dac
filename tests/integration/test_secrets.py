"""Secrets stay secret: a canary password in the PostgreSQL DSN, the Redis URL and the Kafka
SASL settings shows nowhere a person or a scraper could read it."""

from __future__ import annotations

import json
import random
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from projector import scenarios
from projector.cli import app
from projector.config import parse_config
from tests.conftest import Services
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import (
    config_dict,
    daemon_process,
    migrate_all,
    projection,
    publish,
    write_config,
)
from tests.integration.redis_server import RedisServers
from tests.integration.views import RedisViews

pytestmark = pytest.mark.integration

CANARY = "canary-Zq81x7-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_canary_password_shows_nowhere(
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    redis_servers: RedisServers,
) -> None:
    """Proves secrets never leak: with the canary as the PostgreSQL password (the local server
    trusts loopback, so it is sent and ignored), as the password of a Redis that requires it,
    and as the Kafka SASL password, a daemon logging at DEBUG applies a PostgreSQL and a Redis
    projection with poison events in both, loses its Redis for a while (errors logged and
    retried) and stops; the canary is in none of: the daemon's log, /metrics, the dead letters
    in both stores, and the output of check-config, status, dead-letters list and inspect."""
    server = redis_servers.start("--appendonly", "yes", "--requirepass", CANARY, password=CANARY)
    params = conninfo_to_dict(pg_dsn)
    params["password"] = CANARY
    secret_dsn = make_conninfo(**params)  # type: ignore[arg-type]
    topic = new_topic()
    log = scenarios.account_log(random.Random(15), accounts=10, events_per_account=5)
    people = scenarios.customer_log(random.Random(16), 10)
    poison = {
        "stream": "customer:bad",
        "seq": 1,
        "ts": 1,
        "type": "CUSTOMER_RENAMED",
        "data": {"id": "bad", "name": "x"},
    }
    publish(services.kafka, topic, [*log, *people, poison, b"not json"])
    port = free_port()
    data = config_dict(
        services,
        secret_dsn,
        [
            projection("accounts", [topic], ["handlers.accounts"]),
            projection("people", [topic], ["handlers.customers_redis"], store="redis"),
        ],
    )
    data["redis"] = {"url": server.url, "prefix": "canary"}
    data["kafka"]["consumer"] |= {"sasl.username": "projector", "sasl.password": CANARY}
    data["metrics"] = {"enabled": True, "port": port}
    data["log"] = {"level": "DEBUG", "format": "json"}
    path = write_config(tmp_path / "projector.yaml", data)
    migrate_all(parse_config(data, env={}))
    daemon_log = tmp_path / "daemon.log"
    proc = daemon_process(path, log=daemon_log)
    views = RedisViews(server.url, "canary")
    try:
        wait_until(lambda: views.own("people").dead_letters >= 1, "the Redis projection", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        server.kill()
        wait_until(lambda: "transient store error" in daemon_log.read_text(), "a retry", 60)
        server.start()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    outputs = [
        CliRunner().invoke(app, args).output
        for args in (
            ["check-config", "-c", str(path)],
            ["status", "-c", str(path), "--json", "--sample", "0"],
            ["dead-letters", "list", "-c", str(path), "--json"],
            ["inspect", "people", "customer:bad", "-c", str(path), "--json"],
        )
    ]
    with psycopg.connect(pg_dsn) as conn:
        pg_letters = json.dumps(
            conn.execute("select * from projector.dead_letters").fetchall(), default=str
        )
    redis_letters = json.dumps(server.client(decode_responses=True).hgetall("canary:s:people:1:dl"))

    assert '"kind": "handler"' in outputs[2]  # the dead letters were listed
    for where, text in [
        ("the daemon's log", daemon_log.read_text()),
        ("/metrics", metrics),
        ("PostgreSQL dead letters", pg_letters),
        ("Redis dead letters", redis_letters),
        *zip(("check-config", "status", "dead-letters list", "inspect"), outputs, strict=True),
    ]:
        assert CANARY not in text, f"the password shows in {where}"
    assert "not json" in pg_letters or "bm90IGpzb24" in redis_letters  # the letters are there
