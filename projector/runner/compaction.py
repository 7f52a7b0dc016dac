"""The compaction warning of a correlated projection (docs/correlation.md, section 8).

Compaction keeps only the latest change per key of a topic: a rebuild (or a new instance
reading from the start) then sees fewer parts than the live run did, and names other business
events. ``projector run`` warns at start and ``projector rebuild`` before it builds, when a
topic of a correlation has a ``cleanup.policy`` with ``compact``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from projector.config import Config, ProjectionConfig
from projector.source.topic_config import admin_config, cleanup_policies

log = logging.getLogger(__name__)

Policies = Callable[[Sequence[str]], Mapping[str, str]]


def compacted(policies: Mapping[str, str]) -> list[str]:
    """The topics whose ``cleanup.policy`` includes ``compact`` (``compact`` or
    ``compact,delete``), sorted."""
    return sorted(
        t for t, p in policies.items() if "compact" in {x.strip() for x in p.lower().split(",")}
    )


def compaction_warning(projection: str, policies: Mapping[str, str], rebuild: bool) -> str | None:
    """The warning for a correlated projection whose correlation topics have these
    ``policies``, or ``None`` when none is compacted. ``rebuild``: said by ``projector
    rebuild`` (the business events of this rebuild), else by ``projector run``."""
    topics = compacted(policies)
    if not topics:
        return None
    named = ", ".join(topics)
    what = (
        "this rebuild may name other business events than the live run did"
        if rebuild
        else "a rebuild of it may name other business events than this live run"
    )
    return (
        f"projection {projection}: correlation topic(s) {named} have cleanup.policy compact:"
        f" compaction removes older changes of a row, so {what} (fewer parts per transaction)."
        " Keep the correlated topics uncompacted (cleanup.policy=delete, a long retention),"
        " or archive them and rebuild with --history-from"
    )


def kafka_policies(config: Config, timeout: float = 10.0) -> Policies:
    """Reads topics' ``cleanup.policy`` from the config's Kafka cluster, waiting ``timeout``
    seconds at most (brokers away: no warning, and a line at info)."""
    kafka = config.kafka
    conf = admin_config(kafka.bootstrap_servers, kafka.consumer)
    return lambda topics: cleanup_policies(conf, topics, timeout)


def warn_if_compacted(
    projection: ProjectionConfig, policies: Policies, rebuild: bool = False
) -> str | None:
    """Log the warning for ``projection`` (if correlated and compacted) and return it."""
    if projection.correlation is None:
        return None
    warning = compaction_warning(projection.name, policies(projection.correlation_topics), rebuild)
    if warning is not None:
        log.warning("%s", warning)
    return warning
