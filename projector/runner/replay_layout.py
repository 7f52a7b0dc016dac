"""The replay topic's layout warning (docs/replay.md, "Several instances").

A replayed event goes to whichever member of the group holds its partition of the replay
topic. Unless that is the member that holds the stream's partition of the source topic, two
writers apply the stream: on Redis the owner's batches are then refused and planned again
(their cached stream hashes went stale), on PostgreSQL they wait for each other's row locks.
Members hold the same partition numbers of two topics when the topics have as many
partitions and the group's assignor is ``range`` (librdkafka's default, first of
``range,roundrobin``); a stream's replayed events then land in its source partition's number
when the write side keys them by stream with the partitioner of the source's producers.
``projector run`` warns at start when the layout cannot give that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from projector.config import Config, ProjectionConfig
from projector.source.topic_config import admin_config, partition_counts

log = logging.getLogger(__name__)

Counts = Callable[[Sequence[str]], Mapping[str, int]]


def replay_layout_warning(
    projection: ProjectionConfig, partitions: Mapping[str, int], strategy: str
) -> str | None:
    """The warning for ``projection`` whose topics have these numbers of ``partitions``
    (those unknown left out) under the consumer's ``partition.assignment.strategy``
    (``""``: librdkafka's default), or ``None`` when replays can land with their streams'
    consumer, or nothing is known to say otherwise."""
    replay = projection.replay_topic
    if replay is None or replay in projection.topics or replay not in partitions:
        return None
    sources = {partitions[t] for t in projection.topics if t in partitions}
    if len(sources) != 1:
        return None  # source topics of different sizes: no one layout fits them all
    [count] = sources
    first = strategy.replace(" ", "").partition(",")[0] if strategy else "range"
    problems = []
    if partitions[replay] != count:
        problems.append(
            f"replay topic {replay} has {partitions[replay]} partition(s) and the source {count}"
        )
    if first != "range":
        problems.append(f"the assignor is {first}, not range")
    if not problems:
        return None
    return (
        f"projection {projection.name}: {' and '.join(problems)}, so with several instances"
        " (or consumers) a replayed event may be applied by another member than its stream's,"
        " and the two then contend for the stream (Redis: batches refused and planned again;"
        f" PostgreSQL: row lock waits). Give {replay} {count} partitions, keep"
        " partition.assignment.strategy range (the default) and have the write side key"
        " replays by stream with the source producers' partitioner (docs/replay.md)"
    )


def kafka_partitions(config: Config, timeout: float = 10.0) -> Counts:
    """Reads topics' partition counts from the config's Kafka cluster, waiting ``timeout``
    seconds at most (brokers away: no warning, and a line at info)."""
    conf = admin_config(config.kafka.bootstrap_servers, config.kafka.consumer)
    return lambda topics: partition_counts(conf, topics, timeout)


def warn_if_replays_land_elsewhere(
    projection: ProjectionConfig, counts: Counts, strategy: str
) -> str | None:
    """Log the warning for ``projection`` (if it has a replay topic laid out otherwise)
    and return it."""
    if projection.replay_topic is None:
        return None
    warning = replay_layout_warning(projection, counts(projection.consumed_topics), strategy)
    if warning is not None:
        log.warning("%s", warning)
    return warning
