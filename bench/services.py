"""The real services a benchmark runs against, and the throw-away resources of each run: topics,
databases, Redis key prefixes. Each is made fresh for one run and removed after it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.workload import Workload
from projector.replay.responder import create_event_store

ROOT = Path(__file__).resolve().parent.parent
_ENV_KEYS = ("PROJECTOR_TEST_KAFKA", "PROJECTOR_TEST_PG_DSN", "PROJECTOR_TEST_REDIS_URL")


@dataclass(frozen=True)
class Services:
    kafka: str
    pg_dsn: str
    redis_url: str


def services() -> Services:
    """From the environment (as the test suite reads it), else the local ones of
    ``dev/services.sh`` (started if need be)."""
    env = {k: os.environ[k] for k in _ENV_KEYS if os.environ.get(k)}
    if len(env) < len(_ENV_KEYS):
        script = str(ROOT / "dev/services.sh")
        subprocess.run([script, "up"], check=True, capture_output=True)
        out = subprocess.run([script, "env"], check=True, capture_output=True, text=True).stdout
        pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line)
        env = {**dict(pairs), **env}
    return Services(env[_ENV_KEYS[0]], env[_ENV_KEYS[1]], env[_ENV_KEYS[2]])


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class Resources:
    """Makes topics, databases and Redis prefixes and removes them all on ``close``."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._admin = AdminClient({"bootstrap.servers": svc.kafka})
        self._cleanups: list[Callable[[], None]] = []

    def topic(self, partitions: int = 1) -> str:
        name = unique("bench")
        futures = self._admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=30)
        futures[name].result(timeout=30)
        self._cleanups.append(lambda: self._delete_topic(name))
        return name

    def _delete_topic(self, name: str) -> None:
        for fut in self._admin.delete_topics([name], operation_timeout=30).values():
            fut.result(timeout=30)

    def database(self) -> str:
        """A fresh database; its DSN."""
        name = unique("bench")
        with psycopg.connect(self.svc.pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        self._cleanups.append(lambda: self._drop_database(name))
        params = conninfo_to_dict(self.svc.pg_dsn)
        params["dbname"] = name
        return make_conninfo(**params)  # type: ignore[arg-type]

    def _drop_database(self, name: str) -> None:
        with psycopg.connect(self.svc.pg_dsn, autocommit=True) as admin:
            stmt = sql.SQL("drop database if exists {} with (force)")
            admin.execute(stmt.format(sql.Identifier(name)))

    def redis_prefix(self) -> str:
        prefix = unique("bench")
        self._cleanups.append(lambda: delete_redis_prefix(self.svc.redis_url, prefix))
        return prefix

    def group(self, name: str) -> str:
        """A consumer group, deleted on close (its committed offsets with it) if it is empty
        by then. A daemon's is not yet: its static members stay until their session times out,
        so the broker keeps that group until its offsets expire."""

        def delete() -> None:
            for fut in self._admin.delete_consumer_groups([name], request_timeout=30).values():
                with contextlib.suppress(KafkaException):
                    fut.result(timeout=30)

        self._cleanups.append(delete)
        return name

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        errors: list[BaseException] = []
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except Exception as exc:  # clean up the rest all the same
                errors.append(exc)
        if errors:
            raise RuntimeError(f"cleanup failed: {errors}")


@contextmanager
def resources(svc: Services) -> Iterator[Resources]:
    res = Resources(svc)
    with ExitStack() as stack:
        stack.callback(res.close)
        yield res


def delete_redis_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + ":*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def producer(bootstrap: str, **extra: Any) -> Producer:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000,
    }
    return Producer(conf | extra)


def publish(
    bootstrap: str,
    topic: str,
    payloads: Sequence[bytes],
    keys: Sequence[bytes],
    order: Sequence[int],
) -> int:
    """Publish the events ``order`` names (indices into ``payloads`` and ``keys``), in that
    order, keyed by stream (one stream, one partition); returns once Kafka has them all."""
    prod = producer(bootstrap)
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for i in order:
        while True:
            try:
                prod.produce(topic, payloads[i], keys[i], on_delivery=delivered)
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    if prod.flush(120) or errors:
        raise KafkaException(f"publishing to {topic} failed: {errors[:3] or 'timeout'}")
    return len(order)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The high watermark of each partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("bench-wm")})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
    finally:
        consumer.close()


def store_events(
    dsn: str, workload: Workload, payloads: Sequence[bytes], schema: str, table: str
) -> None:
    """The write side's event store of the reference replay responder, filled by COPY."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_event_store(conn, schema, table)
        target = sql.Identifier(schema, table)
        with conn.transaction(), conn.cursor() as cur:
            stmt = sql.SQL("copy {} (stream, seq, payload) from stdin").format(target)
            with cur.copy(stmt) as copy:
                for i, payload in enumerate(payloads):
                    stream = workload.key(i).decode()
                    copy.write_row((stream, workload.seq[i], payload.decode()))
