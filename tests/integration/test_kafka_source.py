"""The Kafka source against a real broker: what a message becomes."""

from __future__ import annotations

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
