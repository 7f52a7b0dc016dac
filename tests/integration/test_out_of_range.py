"""A stored checkpoint that points at deleted records stops the projection loudly."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from projector import scenarios
from tests.integration.conftest import StoreUnderTest
from tests.integration.harness import publish, run_until_caught_up

pytestmark = pytest.mark.integration


def test_a_checkpoint_out_of_range_stops_the_projection_and_resets_nothing(
    store: StoreUnderTest, new_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves on both stores: when retention deletes records the projection has not read yet
    (its stored checkpoint falls below the topic's first offset), the daemon does not jump to
    the earliest or latest offset and carry on: it stops with a non-zero exit and a message
    naming the partition and what to do, and the checkpoint stays where it was."""
    log = scenarios.customer_log(random.Random(18), 40)
    topic = new_topic()
    publish(store.services.kafka, topic, log[:50])
    config = store.config([store.projection("people", [topic], ["customers"])])
    assert run_until_caught_up(config) == 0
    before = store.views.own("people").checkpoint_sum
    publish(store.services.kafka, topic, log[50:])
    admin = AdminClient({"bootstrap.servers": store.services.kafka})
    for future in admin.delete_records([KafkaTopicPartition(topic, 0, before + 10)]).values():
        future.result(30)

    assert run_until_caught_up(config) == 1

    assert store.views.own("people").checkpoint_sum == before
    assert f"{topic}[0] is out of range" in caplog.text
    assert "projector rebuild" in caplog.text
