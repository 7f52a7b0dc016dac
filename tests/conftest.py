"""Fixtures shared by the suite.

Services come from the environment (``PROJECTOR_TEST_KAFKA``, ``PROJECTOR_TEST_PG_DSN``,
``PROJECTOR_TEST_REDIS_URL``) so the suite can run against your own servers; when they are
unset, ``dev/services.sh up`` starts the local ones. Every test gets its own topics, its own
database and its own Redis key prefix, so tests run in any order and re-run without cleanup.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from hypothesis import settings
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=False)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Services:
    kafka: str
    pg_dsn: str
    redis_url: str


_ENV_KEYS = ("PROJECTOR_TEST_KAFKA", "PROJECTOR_TEST_PG_DSN", "PROJECTOR_TEST_REDIS_URL")


def _local_services() -> dict[str, str]:
    subprocess.run([str(ROOT / "dev/services.sh"), "up"], check=True)
    out = subprocess.run(
        [str(ROOT / "dev/services.sh"), "env"], check=True, capture_output=True, text=True
    ).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line)
    return {k: v for k, v in pairs}


@pytest.fixture(scope="session")
def services() -> Services:
    env = {k: os.environ[k] for k in _ENV_KEYS if os.environ.get(k)}
    if len(env) < len(_ENV_KEYS):
        env = {**_local_services(), **env}
    return Services(
        kafka=env["PROJECTOR_TEST_KAFKA"],
        pg_dsn=env["PROJECTOR_TEST_PG_DSN"],
        redis_url=env["PROJECTOR_TEST_REDIS_URL"],
    )


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_dsn(services: Services) -> Iterator[str]:
    """A fresh database for this test, dropped afterwards."""
    name = unique("t")
    with psycopg.connect(services.pg_dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    params = conninfo_to_dict(services.pg_dsn)
    params["dbname"] = name
    yield make_conninfo(**params)  # type: ignore[arg-type]
    with psycopg.connect(services.pg_dsn, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def redis_prefix(services: Services) -> Iterator[str]:
    """A key prefix for this test (``redis.prefix``: keys are ``<prefix>:...``); its keys are
    deleted afterwards."""
    prefix = unique("t")
    yield prefix
    client = redis.Redis.from_url(services.redis_url)
    keys = list(client.scan_iter(match=prefix + ":*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def new_topic(services: Services) -> Iterator[Callable[..., str]]:
    """Creates fresh topics (``new_topic(partitions=3)``) and deletes them afterwards."""
    admin = AdminClient({"bootstrap.servers": services.kafka})
    created: list[str] = []

    def make(partitions: int = 1, name: str | None = None) -> str:
        topic = name or unique("topic")
        futures = admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30)
        futures[topic].result(timeout=30)
        created.append(topic)
        return topic

    yield make
    if created:
        for fut in admin.delete_topics(created, operation_timeout=30).values():
            fut.result(timeout=30)
