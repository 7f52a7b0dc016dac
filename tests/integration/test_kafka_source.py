"""The Kafka source against a real broker: what a message becomes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from projector.core.message import RawMessage
from projector.source.kafka import COMMIT_INTERVAL, KafkaSource, TopicPartition, consumer_config
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

    conf = consumer_config(services.kafka, unique("g"), unique("member"), {}, 2000)
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

        conf = consumer_config(services.kafka, group, unique(name), {}, 2000)
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


def test_the_consumer_fetches_a_couple_of_batches_ahead_not_the_whole_backlog(
    services: Services, new_topic: Callable[..., str]
) -> None:
    """Proves librdkafka keeps about two batches fetched ahead per partition (plus one fetch
    response), not its default of 100,000 messages. Its queue is first in, first out across
    partitions: a replayed event fetched from the replay topic waits behind all that was
    fetched of the source topic before it, and its stream's later events are parked
    meanwhile. Read from librdkafka's own statistics (``fetchq_cnt``, messages fetched and not
    yet consumed) while the consumer takes one message at a time from a backlog of 40,000."""
    topic = new_topic()
    producer = Producer({"bootstrap.servers": services.kafka, "linger.ms": 20})
    for i in range(40_000):
        producer.produce(topic, b"x" * 200, key=b"k")
        if i % 5_000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    queued: list[int] = []

    def statistics(raw: str) -> None:
        partitions = json.loads(raw)["topics"].get(topic, {}).get("partitions", {})
        queued.append(sum(p["fetchq_cnt"] for n, p in partitions.items() if n != "-1"))

    extra = {"statistics.interval.ms": 50, "stats_cb": statistics}
    conf = consumer_config(services.kafka, unique("g"), unique("member"), extra, 500)
    source = KafkaSource(conf, [topic], lambda tps: {}, lambda tps: None)
    try:

        def filled() -> bool:
            source.poll(1, 0.05)
            return bool(queued) and max(queued) >= 1000

        wait_until(filled, "the queue filled to two batches of 500")
        samples = len(queued)

        def sampled_more() -> bool:
            source.poll(1, 0.05)
            return len(queued) >= samples + 5

        wait_until(sampled_more, "five more samples of the queue")
    finally:
        source.close()
    # 1,000 + one fetch response of at most 1 MB (about 4,500 of these messages).
    assert max(queued) < 8_000, f"{max(queued):,} messages were fetched ahead"


def test_offsets_reach_kafka_at_most_once_a_commit_interval_and_on_close(
    services: Services, new_topic: Callable[..., str]
) -> None:
    """Proves the offsets the store committed reach Kafka at most once per COMMIT_INTERVAL on
    the source's clock: the first at once, those held back by the next poll after the
    interval (an idle projection's committed offsets catch up), the last ones on close. At
    low load a batch holds a few messages: committed after each one, ~500 commits a second
    made the group coordinator fall behind, and close(), which waits for the commits in
    flight, took 34-60 s after SIGTERM (bench, Redis latency run)."""
    topic = new_topic()
    producer = Producer({"bootstrap.servers": services.kafka})
    for n in range(3):
        producer.produce(topic, value=b"{}", key=str(n).encode())
    assert producer.flush(10) == 0
    group, now = unique("g"), [100.0]
    conf = consumer_config(services.kafka, group, unique("member"), {}, 2000)
    source = KafkaSource(conf, [topic], lambda tps: {}, lambda tps: None, clock=lambda: now[0])
    tp = KafkaTopicPartition(topic, 0)

    def committed_by_source() -> int:
        # On the source's own connection to the coordinator, which answers in order: a commit
        # sent before this question is in the answer.
        [found] = source._consumer.committed([tp], timeout=10)
        return int(found.offset)

    try:
        wait_until(lambda: bool(source.poll(10, 0.1)), "a message")
        source.commit({(topic, 0): 1})
        wait_until(lambda: committed_by_source() == 1, "the first commit, sent at once")
        for offset in (2, 3):
            source.commit({(topic, 0): offset})
        assert committed_by_source() == 1  # held: the interval has not passed
        source.poll(10, 0)
        assert committed_by_source() == 1  # still held

        now[0] += COMMIT_INTERVAL
        source.poll(10, 0)  # no new commit: the held one goes out
        wait_until(lambda: committed_by_source() == 3, "the held offsets, once it passed")
        source.commit({(topic, 0): 4})
        assert committed_by_source() == 3
    finally:
        source.close()
    reader = Consumer({"bootstrap.servers": services.kafka, "group.id": group})
    try:
        [found] = reader.committed([tp], timeout=10)
        assert found.offset == 4  # sent on close (its revoke)
    finally:
        reader.close()
