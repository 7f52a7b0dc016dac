"""The Kafka source against a real broker: what a message becomes."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from projector.core.message import RawMessage
from projector.source.kafka import KafkaSource, TopicPartition, consumer_config
from tests.conftest import Services, unique
from tests.integration.gaps_harness import wait_until

pytestmark = pytest.mark.integration


def test_messages_keep_key_value_timestamp_and_headers(
    services: Services, new_topic: Callable[..., str]
) -> None:
    """Proves a consumed record becomes a RawMessage with its coordinates, key, value,
    timestamp and headers (text header values as UTF-8 bytes, a null value as None, in their
    order, a repeated name twice), and a record without headers gets an empty tuple."""
    topic = new_topic()
    producer = Producer({"bootstrap.servers": services.kafka})
    headers: list[tuple[str, str | bytes | None]] = [
        ("a", b"\x00raw"),
        ("b", "text é"),
        ("c", None),
        ("a", b"again"),
    ]
    producer.produce(
        topic, value=b'{"x":1}', key=b"k1", headers=headers, timestamp=1_700_000_000_000
    )
    producer.produce(topic, value=None, key=b"k2")
    assert producer.flush(10) == 0
    claimed: list[list[TopicPartition]] = []

    def on_assign(tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        claimed.append(tps)
        return {}  # no checkpoints: from the beginning

    conf = consumer_config(services.kafka, unique("g"), unique("member"), {})
    source = KafkaSource(conf, [topic], on_assign, lambda tps: None)
    got: list[RawMessage] = []
    try:

        def polled_both() -> bool:
            got.extend(source.poll(10, 0.1))
            return len(got) >= 2

        wait_until(polled_both, "two messages")
    finally:
        source.close()
    assert claimed and (topic, 0) in claimed[0]
    assert got == [
        RawMessage(
            topic,
            0,
            0,
            b"k1",
            b'{"x":1}',
            1_700_000_000_000,
            (("a", b"\x00raw"), ("b", "text é".encode()), ("c", None), ("a", b"again")),
        ),
        RawMessage(topic, 0, 1, b"k2", None, got[1].timestamp_ms, ()),
    ]
    assert got[1].timestamp_ms is not None


def test_a_joining_instance_gets_its_partitions_within_about_a_heartbeat(
    services: Services, new_topic: Callable[..., str]
) -> None:
    """Proves a second consumer of a group gets its share of the partitions soon after it
    joins, while the first keeps polling: the first learns of the rebalance from its next
    heartbeat, which projector sends every second (librdkafka's default, 3 s, left the second
    instance idle for up to 3 s; the bound here leaves room for a loaded machine)."""
    topic = new_topic(partitions=2)
    group = unique("g")
    owned: dict[str, set[TopicPartition]] = {"a": set(), "b": set()}

    def source(name: str) -> KafkaSource:
        def assigned(tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
            owned[name] |= set(tps)
            return {}

        def revoked(tps: list[TopicPartition]) -> None:
            owned[name] -= set(tps)

        conf = consumer_config(services.kafka, group, unique(name), {})
        assert conf["heartbeat.interval.ms"] <= 1000
        return KafkaSource(conf, [topic], assigned, revoked)

    a = source("a")
    b: KafkaSource | None = None
    try:
        wait_until(lambda: a.poll(10, 0.05) is not None and len(owned["a"]) == 2, "a owns both")
        b = source("b")
        joined = time.monotonic()

        def both_own_one() -> bool:
            a.poll(10, 0.05)
            assert b is not None
            b.poll(10, 0.05)
            return len(owned["a"]) == 1 and len(owned["b"]) == 1

        wait_until(both_own_one, "a partition each")
        waited = time.monotonic() - joined
    finally:
        a.close()
        if b is not None:
            b.close()
    assert waited < 2.5, f"the joining instance waited {waited:.1f} s for its partition"
