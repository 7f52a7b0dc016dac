"""What ``projector gaps`` and ``projector status`` do: list a projection's gaps, skip a gap by
hand, and a projection's status (consumer lag from Kafka against the stored checkpoints,
parked events, open gaps, open dead letters).

Everything here only reads, except :func:`skip_gaps`: it writes one transaction per gap through
the daemon's own batch applier, serialised with a running daemon on the stream's position lock.
Reading lag never joins the projection's consumer group, so it is safe while the daemon runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from confluent_kafka import Consumer, TopicPartition

from projector.config import Config, ProjectionConfig
from projector.core.gaps import Gap
from projector.runner.batch import BatchApplier, BatchResult, Clock
from projector.runner.worker import build_applier, load_handlers
from projector.source.kafka import client_logging
from projector.store.base import Store
from projector.store.connect import StoreSet
from projector.store.errors import transient_retries


def selected(config: Config, projection: str | None) -> list[ProjectionConfig]:
    """The named projection, or every projection of the config."""
    return [config.projection(projection)] if projection else list(config.projections)


def gaps(
    config: Config,
    stores: StoreSet,
    projection: str | None,
    stream: str | None,
    include_skipped: bool,
) -> list[tuple[str, Gap]]:
    """(projection, gap) for the open and held gaps, and the skipped ones if asked."""
    return [
        (p.name, g)
        for p in selected(config, projection)
        for g in stores.of(p).list_gaps(p.name, stream)
        if include_skipped or g.state != "skipped"
    ]


@dataclass(frozen=True)
class SkipOutcome:
    stream: str
    listed: tuple[int, int]  # the gap as listed before its transaction
    skipped: list[tuple[int, int]]  # what was skipped: empty if it was filled meanwhile
    drained: int  # parked events applied behind it
    dead_letters: int  # drained events that failed instead


def skip_gaps(
    config: Config,
    stores: StoreSet,
    projection: str,
    stream: str,
    seq: int | None,
    clock: Clock,
) -> list[SkipOutcome]:
    """Give up on the open gaps of ``stream`` (only the one holding ``seq``, if given): each
    is recorded as skipped and what was parked behind it drains, one transaction per gap."""
    proj = config.projection(projection)
    stores.check([proj], [load_handlers(proj)])
    store = stores.of(proj)
    applier = build_applier(config, proj, store, clock)
    if not isinstance(applier, BatchApplier):
        raise ValueError(f"projection {proj.name!r} is in merge mode: it has no gaps to skip")
    listed = [
        g
        for _, g in gaps(config, stores, proj.name, stream, False)
        if seq is None or g.from_seq <= seq <= g.to_seq
    ]
    return [_skip_one(applier, store, proj, g) for g in listed]


def _skip_one(
    applier: BatchApplier, store: Store, proj: ProjectionConfig, listed: Gap
) -> SkipOutcome:
    """Skip what is still missing of ``listed``, read again under the stream's lock (events
    may have filled, shrunk or split it since it was listed)."""
    for attempt in transient_retries():
        with attempt:
            result = BatchResult()
            with store.batch(proj.name, proj.schema_name) as tx:
                skipped = applier.skip_gap(tx, listed, result)
    return SkipOutcome(
        listed.stream,
        (listed.from_seq, listed.to_seq),
        skipped,
        result.applied,
        len(result.dead_letters),
    )


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    low: int
    high: int
    checkpoint: int | None  # the next offset to read; None: never read (lag from the low mark)

    @property
    def lag(self) -> int:
        start = self.low if self.checkpoint is None else max(self.checkpoint, self.low)
        return max(0, self.high - start)


@dataclass(frozen=True)
class ProjectionStatus:
    projection: str
    partitions: list[PartitionLag]
    unavailable_topics: dict[str, str]  # topic -> why its offsets could not be read
    parked: int
    open_gaps: int  # open or held
    held_gaps: int
    oldest_gap_first_seen: float | None
    dead_letters: int  # open ones
    rate: float | None = None  # messages/s read over the sample window; None: not sampled

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def eta_seconds(self) -> float | None:
        """Time to catch up at the sampled rate; 0 when caught up, None when unknown/stuck."""
        if self.lag == 0:
            return 0.0
        return self.lag / self.rate if self.rate else None


def status(
    config: Config,
    stores: StoreSet,
    projection: str | None,
    sample: float = 0.0,
    wait: Callable[[float], None] = time.sleep,
) -> list[ProjectionStatus]:
    """The status of one projection, or of every projection in the config. With ``sample``
    seconds, projections that are behind also get their rate (checkpoints read twice, that
    far apart) and so an ETA."""
    found = _status_once(config, stores, projection)
    behind = [s for s in found if s.lag > 0]
    if sample <= 0 or not behind:
        return found
    before = {s.projection: (_applied(stores, s.projection), time.monotonic()) for s in behind}
    wait(sample)
    rates = {}
    for name, (count, started) in before.items():
        rates[name] = (_applied(stores, name) - count) / max(time.monotonic() - started, 1e-9)
    return [replace(s, rate=rates.get(s.projection)) for s in found]


def _applied(stores: StoreSet, projection: str) -> int:
    return sum(o or 0 for o in stores.of(projection).checkpoints(projection).values())


def _status_once(
    config: Config, stores: StoreSet, projection: str | None
) -> list[ProjectionStatus]:
    kafka = config.kafka
    conf = {k: v for k, v in kafka.consumer.items() if k != "group.instance.id"}
    # A group no projection can have (names never hold "-"); never joined: no subscribe.
    conf |= {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": f"{kafka.group_prefix}.status-reader",
        **client_logging(),
    }
    consumer = Consumer({**conf, "enable.auto.commit": False})
    try:
        return [_status(consumer, stores.of(p), p) for p in selected(config, projection)]
    finally:
        consumer.close()


def _status(consumer: Consumer, store: Store, proj: ProjectionConfig) -> ProjectionStatus:
    checkpoints = store.checkpoints(proj.name)
    partitions: list[PartitionLag] = []
    unavailable: dict[str, str] = {}
    for topic in proj.consumed_topics:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            unavailable[topic] = "no metadata" if meta is None else meta.error.str()
            continue
        partitions += _lags(consumer, topic, sorted(meta.partitions), checkpoints)
    open_gaps, held, oldest = store.gap_summary(proj.name)
    return ProjectionStatus(
        proj.name,
        partitions,
        unavailable,
        store.count_parked(proj.name),
        open_gaps,
        held,
        oldest,
        store.count_open_dead_letters(proj.name),
    )


def _lags(
    consumer: Consumer,
    topic: str,
    partitions: list[int],
    checkpoints: Mapping[tuple[str, int], int | None],
) -> list[PartitionLag]:
    out = []
    for part in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=5)
        out.append(PartitionLag(topic, part, low, high, checkpoints.get((topic, part))))
    return out
