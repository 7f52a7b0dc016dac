"""``projector rebuild PROJECTION``: build the views again from the whole history, beside the
live ones, then swap them in while the daemon keeps running.

1. Check: every partition still holds the projection's history (its low watermark is not
   past the first offset the projection ever read), unless told to go on without it.
2. Build: read every partition from the beginning (assigned by hand, no consumer group) and
   apply it with the projection's own handlers into a shadow copy of its views, through the
   same batch appliers the daemon uses, under a state of its own (see
   :mod:`projector.store.postgres_rebuild` and :mod:`projector.store.redis_rebuild`). A
   correlation runs under the live correlation name, with idle ticks once its partitions are
   read to their end. Its progress is stored with each batch, so an interrupted rebuild
   (Ctrl-C, kill) resumes where it stopped.
3. Swap: once within a batch of the live projection, in one transaction: hold the live
   checkpoints, read up to them, swap views and state. The daemon goes on from the rebuilt
   state, neither missing nor repeating an event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Protocol

from confluent_kafka import KafkaException

from projector.config import Config, ProjectionConfig
from projector.core.decode import Decoder
from projector.core.gaps import Gap
from projector.core.message import RawMessage
from projector.runner.batch import BatchApplier, BatchResult, Clock
from projector.runner.compaction import Policies, kafka_policies, warn_if_compacted
from projector.runner.daemon import collecting_less_often
from projector.runner.dead_letters import resolve_one
from projector.runner.merge_batch import MergeApplier
from projector.runner.worker import (
    IDLE_TICK_SECONDS,
    Applier,
    build_applier,
    build_decoders,
    load_handlers,
)
from projector.source.kafka import PartitionReader, TopicPartition
from projector.store.base import DeadLetterRow, LivePartition, NotCaughtUp, Store
from projector.store.connect import open_store, view_migrations
from projector.store.errors import is_transient, transient_retries
from projector.store.migrate import ViewMigrations, check_schema
from projector.store.postgres import PostgresStore
from projector.store.postgres_rebuild import PgRebuildStore
from projector.store.redis import RedisStore
from projector.store.redis_rebuild import RedisRebuildStore

log = logging.getLogger(__name__)


class HistoryTrimmed(ValueError):
    """A topic no longer holds the projection's whole history."""


@dataclass(frozen=True)
class PartitionPlan:
    topic: str
    partition: int
    low: int  # the first offset Kafka still holds
    high: int  # the next offset to be written
    start: int  # where the projection's history starts (0 when not recorded)
    live: int | None  # the live projection's next offset
    rebuilt: int | None  # the rebuild's next offset (when resuming)
    history: bool = False  # a topic read for the rebuild only (--history-from)

    @property
    def trimmed(self) -> bool:
        return not self.history and self.low > self.start

    @property
    def to_read(self) -> int:
        return max(0, self.high - max(self.low, self.rebuilt or 0))


@dataclass(frozen=True)
class RebuildPlan:
    projection: str
    shadow_schema: str
    resume: bool
    partitions: list[PartitionPlan]

    @property
    def to_read(self) -> int:
        return sum(p.to_read for p in self.partitions)

    @property
    def trimmed(self) -> list[PartitionPlan]:
        return [p for p in self.partitions if p.trimmed]


@dataclass
class RebuildReport:
    plan: RebuildPlan
    status: str = "planned"  # planned | swapped | interrupted
    read: int = 0
    seconds: float = 0.0
    checkpoints: dict[TopicPartition, int] = field(default_factory=dict)
    old_dropped: bool = False
    warnings: list[str] = field(default_factory=list)  # said before it built (compaction)


class Progress:
    """Where a rebuild reports how far it is; the CLI shows a bar on a terminal, lines
    otherwise."""

    def update(self, done: int, total: int, phase: str) -> None:
        """``done`` of ``total`` messages read; ``phase`` says what it is doing."""

    def close(self) -> None: ...


def _trimmed_message(plan: RebuildPlan) -> str:
    parts = ", ".join(
        f"{p.topic}[{p.partition}] starts at {p.low}, history at {p.start}" for p in plan.trimmed
    )
    return (
        f"cannot rebuild {plan.projection}: the topics no longer hold its whole history ({parts});"
        " retention or compaction removed what the views were built from. Say where the rest is"
        " with --history-from TOPIC (a topic it was re-published or archived to), or pass"
        " --allow-trimmed-history to build from what is left"
    )


class RebuildStore(Protocol):
    """A store's side of a rebuild (PostgreSQL: a shadow schema; Redis: a new key version)."""

    name: str  # the rebuild's own projection name in the store: "<name>#rebuild"
    shadow: str  # the view schema its handlers write to

    def exclusive(self) -> AbstractContextManager[None]: ...

    def live_partitions(self) -> dict[TopicPartition, LivePartition]: ...

    def in_progress(self) -> bool: ...

    def start(self, views: Sequence[ViewMigrations]) -> None: ...

    def abandon(self) -> None: ...

    def swap(
        self,
        catch_up: Callable[[Mapping[TopicPartition, int]], None],
        lock_timeout: float,
        partitions: Sequence[TopicPartition],
    ) -> dict[TopicPartition, int]: ...

    def drop_old(self, lock_timeout: float) -> bool: ...


class Rebuilder:
    """One projection's rebuild."""

    def __init__(
        self,
        config: Config,
        projection: str,
        progress: Progress | None = None,
        clock: Clock = time.time,
        stop: threading.Event | None = None,
        lock_timeout: float = 5.0,
        history: Sequence[str] = (),
        policies: Policies | None = None,
    ) -> None:
        self.config = config
        self.history = list(history)
        self.policies = policies or kafka_policies(config)
        self.projection: ProjectionConfig = config.projection(projection)
        self.progress = progress or Progress()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.lock_timeout = lock_timeout
        self.store: Store
        if self.projection.store == "postgres":
            # The swap creates and renames schemas: the migrator role's work.
            pg = config.postgres_config()
            self.store = PostgresStore(pg.migrator_dsn, pg.schema_, pg.connect_timeout)
        else:
            self.store = open_store(config, self.projection)
        self.handlers = load_handlers(self.projection)
        self.views = view_migrations(self.projection, self.handlers)
        name, schema = self.projection.name, self.projection.schema_name
        self.rebuild: RebuildStore
        if isinstance(self.store, PostgresStore):
            self.rebuild = PgRebuildStore(self.store, name, schema)
        else:
            assert isinstance(self.store, RedisStore)
            self.rebuild = RedisRebuildStore(self.store, name, schema)

    def close(self) -> None:
        self.store.close()

    def _reader(self) -> PartitionReader:
        kafka = self.config.kafka
        conf = {k: v for k, v in kafka.consumer.items() if k != "group.instance.id"}
        conf |= {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": f"{kafka.group_prefix}.{self.projection.name}.rebuild",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 100,
        }
        return PartitionReader(conf, [*self.projection.consumed_topics, *self.history])

    def plan(self, reader: PartitionReader) -> RebuildPlan:
        if isinstance(self.store, PostgresStore):
            check_schema(self.store.conn, self.store.schema, self.views)
        live = self.rebuild.live_partitions()
        resume = self.rebuild.in_progress()
        rebuilt = self.store.checkpoints(self.rebuild.name) if resume else {}
        parts = []
        for (topic, part), (low, high) in sorted(reader.watermarks().items()):
            known = live.get((topic, part))
            start = 0 if known is None or known.start_offset is None else known.start_offset
            parts.append(
                PartitionPlan(
                    topic,
                    part,
                    low,
                    high,
                    start,
                    None if known is None else known.next_offset,
                    rebuilt.get((topic, part)),
                    topic in self.history,
                )
            )
        return RebuildPlan(self.projection.name, self.rebuild.shadow, resume, parts)

    def run(
        self, dry_run: bool = False, allow_trimmed: bool = False, restart: bool = False
    ) -> RebuildReport:
        """Plan, and unless ``dry_run``: build, catch up and swap. Raises
        :class:`HistoryTrimmed` (unless allowed, or told where the rest of the history is:
        ``history`` topics), or ``RebuildRunning`` when another rebuild holds the lock."""
        started = time.monotonic()
        with self.rebuild.exclusive():
            reader = self._reader()
            try:
                if restart and not dry_run:
                    self.rebuild.abandon()
                plan = self.plan(reader)
                report = RebuildReport(plan)
                warning = warn_if_compacted(self.projection, self.policies, rebuild=True)
                report.warnings += [warning] if warning else []
                if dry_run:
                    return report  # it shows the partitions whose history is trimmed
                if plan.trimmed and not (allow_trimmed or self.history):
                    raise HistoryTrimmed(_trimmed_message(plan))
                if not plan.resume:
                    self.rebuild.start(self.views)
                self._build(reader, plan, report)
            finally:
                reader.close()
        report.seconds = time.monotonic() - started
        return report

    def _build(self, reader: PartitionReader, plan: RebuildPlan, report: RebuildReport) -> None:
        applier = build_applier(self.config, self._shadow(), self.store, self.clock)
        if not plan.resume and isinstance(applier, BatchApplier):
            self._carry_skips(applier)
        decoders = build_decoders(self.projection)
        for topic in self.history:  # events as on the projection's own topics
            decoders[topic] = decoders[self.projection.topics[0]]
        history_ends = {(p.topic, p.partition): p.high for p in plan.partitions if p.history}
        consumed = [(p.topic, p.partition) for p in plan.partitions if not p.history]
        claims = self.store.claim(self.rebuild.name, reader.partitions, "rebuild")
        epochs = {tp: c.epoch for tp, c in claims.items()}
        reader.assign({tp: c.next_offset for tp, c in claims.items()})
        batch = Batcher(applier, decoders, epochs, reader, self.projection.batch_max_messages)
        batch.idle_every = idle_every(self.projection)
        total = plan.to_read
        slack = self.projection.batch_max_messages
        while not self.stop.is_set():
            applied = batch.next(timeout=0.2)
            report.read += applied
            live = {tp: p.next_offset or 0 for tp, p in self.rebuild.live_partitions().items()}
            behind = sum(max(0, o - batch.position(tp)) for tp, o in live.items())
            self.progress.update(report.read, max(total, report.read + behind), "reading")
            history_left = any(batch.position(tp) < end for tp, end in history_ends.items())
            if applied or behind > slack or history_left:
                continue
            if self._skip_as_live_did(applier, decoders):
                continue  # what the skips drained is applied: look again before swapping
            self.progress.update(report.read, report.read + behind, "swapping")
            try:
                report.checkpoints = self.rebuild.swap(
                    lambda targets: batch.read_up_to(targets, report), self.lock_timeout, consumed
                )
            except NotCaughtUp as exc:
                log.info("rebuild %s: not swapped yet (%s); reading on", plan.projection, exc)
                batch.rewind(self.store.checkpoints(self.rebuild.name))
                continue
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.info(
                    "rebuild %s: swap waited too long (%s); trying again", plan.projection, exc
                )
                self.store.close()
                batch.rewind(self.store.checkpoints(self.rebuild.name))
                continue
            report.status = "swapped"
            self.progress.update(report.read, report.read, "dropping the old views")
            report.old_dropped = self._drop_old()
            return
        report.status = "interrupted"

    def _carry_skips(self, applier: BatchApplier) -> None:
        """Record in the rebuild's state the ranges the live run gave up on (``on_give_up:
        skip``, ``projector gaps skip``), so the rebuild steps over them as the live run did.
        The topics hold nothing for them: without this, each such stream would stop before
        its range in the rebuild, and the swap would show readers an older view."""
        skipped = [g for g in self.store.list_gaps(self.projection.name) if g.state == "skipped"]
        if not skipped:
            return
        shadow = self._shadow()
        streams = sorted({g.stream for g in skipped})
        # Written as gaps, then marked skipped, as the live run's skip does.
        gaps = [replace(g, state="open") for g in skipped]
        for attempt in transient_retries():
            with attempt, self.store.batch(shadow.name, shadow.schema_name) as tx:
                tx.lock_positions(streams, applier.rules)
                tx.replace_gaps(streams, gaps)
                for gap in gaps:
                    tx.mark_skipped(gap)
        log.info(
            "rebuild %s: %d range(s) the live run skipped, skipped in the rebuild too",
            self.projection.name,
            len(skipped),
        )

    def _skip_as_live_did(self, applier: Applier, decoders: Mapping[str, Decoder]) -> bool:
        """Before the swap: skip in the rebuild what the live run skipped since the rebuild
        began (gaps, :meth:`_carry_skips` having taken those skipped before), and the handler
        dead letters the operator skipped (``projector dead-letters skip``; their handler
        still fails). Without this the rebuild would hold those streams there, and the swap
        would show readers an older view. True if it skipped anything."""
        if not isinstance(applier, BatchApplier):
            return False
        gaps = self._skip_gaps_as_live_did(applier)
        return self._skip_dead_letters_as_live_did(applier, decoders) or gaps

    def _skip_gaps_as_live_did(self, applier: BatchApplier) -> bool:
        live: dict[str, list[Gap]] = {}
        for g in self.store.list_gaps(self.projection.name):
            if g.state == "skipped":
                live.setdefault(g.stream, []).append(g)
        if not live:
            return False
        mine = [
            (g, s)
            for g in self.store.list_gaps(self.rebuild.name)
            if g.state != "skipped"
            for s in live.get(g.stream, ())
            if g.from_seq <= s.to_seq and s.from_seq <= g.to_seq
        ]
        shadow = self._shadow()
        for _gap, skipped in mine:
            for attempt in transient_retries():
                with attempt, self.store.batch(shadow.name, shadow.schema_name) as tx:
                    applier.skip_gap(tx, skipped, BatchResult())
        if mine:
            log.info(
                "rebuild %s: %d gap(s) skipped, as the live run skipped them meanwhile",
                self.projection.name,
                len(mine),
            )
        return bool(mine)

    def _skip_dead_letters_as_live_did(
        self, applier: BatchApplier, decoders: Mapping[str, Decoder]
    ) -> bool:
        skipped = {
            _event_key(row)
            for row in self.store.list_dead_letters(self.projection.name, "skipped", _ALL)
            if row.kind == "handler"
        }
        skipped.discard(None)
        if not skipped:
            return False
        shadow = self._shadow()
        again = [
            row.id
            for row in self.store.list_dead_letters(self.rebuild.name, "open", _ALL)
            if row.kind == "handler" and _event_key(row) in skipped
        ]
        for letter_id in again:
            for attempt in transient_retries():
                with attempt, self.store.batch(shadow.name, shadow.schema_name) as tx:
                    resolve_one(applier, decoders, tx, letter_id, "skip")
        if again:
            log.info(
                "rebuild %s: %d dead letter(s) skipped, as they were in the live run",
                self.projection.name,
                len(again),
            )
        return bool(again)

    def _shadow(self) -> ProjectionConfig:
        """The projection as the rebuild applies it: its state under the rebuild's name, its
        views in the shadow schema, and its correlation under the live name (the prefix of
        business ids and streams: the rebuild names the very events the live run did)."""
        update: dict[str, object] = {"name": self.rebuild.name, "view_schema": self.rebuild.shadow}
        corr = self.projection.correlation
        if corr is not None:
            update["correlation"] = corr.model_copy(
                update={"name": corr.name or self.projection.name}
            )
        return self.projection.model_copy(update=update)

    def _drop_old(self) -> bool:
        """Drop the swapped-out schema, waiting for its last readers a while."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.rebuild.drop_old(self.lock_timeout):
                return True
        return False


_ALL = 1_000_000  # dead letters listed at once: every one a rebuild may meet


def _event_key(row: DeadLetterRow) -> tuple[str, int | None, str] | None:
    """What tells one dead-lettered event from another across the live run and a rebuild."""
    return None if row.event is None else (row.event.stream, row.event.seq, row.event.id)


def idle_every(projection: ProjectionConfig) -> float:
    """How often (real seconds, at most) a correlation's idle tick runs: as the daemon's."""
    c = projection.correlation
    idle_after = None if c is None else c.idle_after
    return min(IDLE_TICK_SECONDS, (idle_after or IDLE_TICK_SECONDS * 4) / 4)


class Batcher:
    """Reads and applies the rebuild's batches; tracks its next offsets."""

    def __init__(
        self,
        applier: Applier,
        decoders: Mapping[str, Decoder],
        epochs: Mapping[TopicPartition, int],
        reader: PartitionReader,
        size: int,
    ) -> None:
        self.applier = applier
        self.decoders = decoders
        self.epochs = epochs
        self.reader = reader
        self.size = size
        self.offsets: dict[TopicPartition, int] = {}
        self.idle_every = IDLE_TICK_SECONDS  # real seconds between idle ticks, at most
        self._next_idle = 0.0

    def position(self, tp: TopicPartition) -> int:
        return self.offsets.get(tp, 0)

    def rewind(self, stored: Mapping[TopicPartition, int | None]) -> None:
        """Back to the stored checkpoints (what a rolled-back swap applied is read again)."""
        self.reader.assign(stored)
        self.offsets = {tp: o for tp, o in stored.items() if o is not None}

    def _apply(self, messages: list[RawMessage], retry: bool) -> None:
        positions = {
            tp: o
            for tp, o in self.reader.positions().items()
            if tp in {(m.topic, m.partition) for m in messages}
        }
        if retry:
            for attempt in transient_retries():
                with attempt:
                    result = self.applier.apply(messages, self.decoders, self.epochs, positions)
        else:
            result = self.applier.apply(messages, self.decoders, self.epochs, positions)
        self.offsets.update(result.checkpoints)

    def next(self, timeout: float) -> int:
        """Read and apply one batch (committed on its own); how many messages it held."""
        messages = self.reader.poll(self.size, timeout)
        if messages:
            self._apply(messages, retry=True)
        else:
            self.offsets.update(self.reader.positions())
            self._idle_tick()
        return len(messages)

    def _idle_tick(self) -> None:
        """A correlation's partitions read to their end advance its watermark as in the live
        run (an empty partition holds nothing back; with ``idle_after``, the clock raises a
        caught-up one), so the rebuild closes what the live run closed by idleness instead of
        leaving it open for the daemon to close again after the swap. At most every
        ``idle_every`` seconds, when a poll brought nothing."""
        applier = self.applier
        if not isinstance(applier, MergeApplier) or applier.correlation is None:
            return
        now = time.monotonic()
        if now < self._next_idle:
            return
        self._next_idle = now + self.idle_every
        topics = applier.correlation.topics
        try:
            marks = self.reader.watermarks()
        except KafkaException as exc:  # a broker away: the next idle poll asks again
            log.info("rebuild: cannot read the partitions' ends for the idle tick: %s", exc)
            return
        ends = {tp: high for tp, (_, high) in marks.items() if tp[0] in topics}
        caught_up = {tp for tp, high in ends.items() if self.position(tp) >= high}
        for attempt in transient_retries():
            with attempt:
                applier.idle_tick(self.epochs, caught_up)

    def read_up_to(self, targets: Mapping[TopicPartition, int], report: RebuildReport) -> None:
        """Inside the swap: apply until every partition reached ``targets`` (no retry: an error
        here aborts the swap, which is tried again). Gives up after a few seconds."""
        deadline = time.monotonic() + 10
        while any(self.position(tp) < o for tp, o in targets.items()):
            if time.monotonic() > deadline:
                raise NotCaughtUp("the live projection moved on faster than the rebuild read")
            messages = self.reader.poll(self.size, 0.2)
            if messages:
                self._apply(messages, retry=False)
                report.read += len(messages)
            else:
                self.offsets.update(self.reader.positions())


def rebuild(
    config: Config,
    projection: str,
    *,
    dry_run: bool = False,
    allow_trimmed: bool = False,
    restart: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    lock_timeout: float = 5.0,
    clock: Callable[[], float] = time.time,
    history: Sequence[str] = (),
) -> RebuildReport:
    """Rebuild ``projection`` (see :class:`Rebuilder`). ``history`` names topics that hold the
    history retention removed from the projection's topics; they are read too."""
    rebuilder = Rebuilder(config, projection, progress, clock, stop, lock_timeout, history)
    try:
        with collecting_less_often():
            return rebuilder.run(dry_run, allow_trimmed, restart)
    finally:
        rebuilder.close()
