"""Smoke tests: each service is the real thing and behaves as projector relies on."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.conftest import Services, unique

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, per_partition: dict[int, int]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for partition, count in per_partition.items():
        for i in range(count):
            producer.produce(topic, value=f"{partition}:{i}".encode(), partition=partition)
    assert producer.flush(30) == 0


def _consume_all(consumer: Consumer, expected: int) -> list[str]:
    seen: list[str] = []
    for _ in range(200):  # bounded: 200 polls of at most 0.5 s
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            assert msg.error() is None, msg.error()
            seen.append((msg.value() or b"").decode())
        if len(seen) >= expected:
            break
    return seen


def test_kafka_round_trip_with_group_offsets_and_high_watermarks(
    services: Services, new_topic: Callable[..., str]
) -> None:
    """Proves a real broker: produced counts show as high watermarks, a consumer group commits
    offsets, and a second member of the group resumes from them instead of re-reading."""
    topic = new_topic(partitions=3)
    counts = {0: 5, 1: 7, 2: 11}
    _produce(services.kafka, topic, counts)
    group = unique("group")
    conf = {
        "bootstrap.servers": services.kafka,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    first = Consumer(conf)
    first.subscribe([topic])
    seen = _consume_all(first, sum(counts.values()))
    assert sorted(seen) == sorted(f"{p}:{i}" for p, n in counts.items() for i in range(n))
    for partition, count in counts.items():
        low, high = first.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        assert (low, high) == (0, count)
    first.commit(asynchronous=False)
    committed = first.committed([TopicPartition(topic, p) for p in counts], timeout=10)
    assert {tp.partition: tp.offset for tp in committed} == counts
    first.close()

    _produce(services.kafka, topic, {0: 1})
    second = Consumer(conf)
    second.subscribe([topic])
    assert _consume_all(second, 1) == ["0:0"]  # only the new message, read from offset 5
    assert second.position([TopicPartition(topic, 0)])[0].offset == 6
    second.close()


def test_postgres_transaction_rolls_back(pg_dsn: str) -> None:
    """Proves a real PostgreSQL with transactions: a rolled-back insert leaves no row."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key)")
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute("insert into t values (1)")
            raise RuntimeError("abort")
        with conn.transaction():
            conn.execute("insert into t values (2)")
        rows = conn.execute("select id from t order by id").fetchall()
    assert rows == [(2,)]


def test_redis_multi_exec_and_persistence(services: Services, redis_prefix: str) -> None:
    """Proves a real Redis: MULTI/EXEC applies as a unit; AOF is on and nothing is evicted."""
    client = redis.Redis.from_url(services.redis_url)
    with client.pipeline(transaction=True) as pipe:
        pipe.set(redis_prefix + ":a", 1)
        pipe.incr(redis_prefix + ":a")
        pipe.hset(redis_prefix + ":h", "f", "v")
        assert pipe.execute() == [True, 2, 1]
    assert client.get(redis_prefix + ":a") == b"2"
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.close()
