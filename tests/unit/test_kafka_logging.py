"""librdkafka's own log lines reach projector's logging (its level and format), not stderr."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Consumer

from projector.source.kafka import consumer_config


def test_a_broker_that_refuses_connections_is_logged_through_projector(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves the consumer's librdkafka messages (here: a refused connection, as when the
    broker is down) arrive as records of the ``projector.kafka`` logger."""
    conf = consumer_config("127.0.0.1:1", "g", "logging-test", {"reconnect.backoff.ms": 10}, 2000)
    consumer = Consumer(conf)
    try:
        with caplog.at_level(logging.DEBUG, logger="projector.kafka"):
            deadline = time.monotonic() + 20
            while not any(r.name == "projector.kafka" for r in caplog.records):
                assert time.monotonic() < deadline, "no librdkafka line was logged"
                consumer.poll(0.1)  # librdkafka hands its log lines over in poll
    finally:
        consumer.close()
    assert any("127.0.0.1:1" in r.getMessage() for r in caplog.records)
