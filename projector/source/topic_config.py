"""Kafka topic settings projector checks before it relies on a topic's history: each topic's
``cleanup.policy``, read with the admin client (``describe_configs``). Reads only."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, untyped
    AdminClient,
    ConfigResource,
    ResourceType,
)

from projector.source.kafka import client_logging

log = logging.getLogger(__name__)

# The consumer settings an admin client needs too: where the brokers are and how to log in.
_SHARED = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.")


def admin_config(bootstrap: str, consumer: Mapping[str, Any]) -> dict[str, Any]:
    """An admin client's settings from the consumer's: its connection and security settings
    only (consumer-only keys would be logged as ignored)."""
    shared = {k: v for k, v in consumer.items() if k.startswith(_SHARED)}
    return {**shared, "bootstrap.servers": bootstrap, **client_logging()}


def cleanup_policies(
    conf: Mapping[str, Any], topics: Sequence[str], timeout: float = 10.0
) -> dict[str, str]:
    """Each topic's ``cleanup.policy`` (``delete``, ``compact`` or ``compact,delete``). A topic
    whose settings cannot be read (missing, not authorised, brokers away) is left out and
    logged: the caller warns about what it knows and goes on."""
    if not topics:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in sorted(set(topics))]
    out: dict[str, str] = {}
    try:
        admin = AdminClient(dict(conf))  # kept until the futures are done: else it is destroyed
        futures = admin.describe_configs(resources, request_timeout=timeout)
    except KafkaException as exc:
        log.info("cannot read the topics' cleanup.policy: %s", exc)
        return out
    for resource, future in futures.items():
        try:
            entry = future.result(timeout).get("cleanup.policy")
        except (KafkaException, TimeoutError) as exc:
            log.info(
                "cannot read cleanup.policy of topic %s: %s", resource.name, str(exc) or "timed out"
            )
            continue
        if entry is not None and entry.value is not None:
            out[resource.name] = str(entry.value)
    return out


def partition_counts(
    conf: Mapping[str, Any], topics: Sequence[str], timeout: float = 10.0
) -> dict[str, int]:
    """Each topic's number of partitions, from the cluster's metadata. A topic that cannot
    be read (missing, not authorised, brokers away) is left out and logged at info."""
    if not topics:
        return {}
    try:
        meta = AdminClient(dict(conf)).list_topics(timeout=timeout).topics
    except KafkaException as exc:
        log.info("cannot read the topics' partitions: %s", exc)
        return {}
    out: dict[str, int] = {}
    for topic in sorted(set(topics)):
        found = meta.get(topic)
        if found is None or found.error is not None or not found.partitions:
            log.info("cannot read the partitions of topic %s", topic)
            continue
        out[topic] = len(found.partitions)
    return out
