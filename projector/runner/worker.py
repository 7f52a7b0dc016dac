"""One projection's loop: poll a batch, apply it in one store transaction, then commit to Kafka.

Transient store errors (lost connection, deadlock, serialization failure) retry the same batch
with exponential backoff; the batch is idempotent, so a retry after an unknown COMMIT outcome is
safe. A batch that finds itself fenced drops the partitions it no longer owns and goes on with
the rest. Nothing sleeps in the loop except that backoff, which a stop request interrupts.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from projector.apply import LoadedHandler, load_handler, load_rule
from projector.config import Config, ProjectionConfig, correlation_rules
from projector.core.decode import Decoder, load_decoder
from projector.core.merge import MergeRules
from projector.core.message import PartitionSpan, RawMessage, partition_spans
from projector.core.sequencer import SequenceRules
from projector.document_view import document_view
from projector.faults import crash_point
from projector.metrics import Metrics
from projector.replay.channels import open_channel
from projector.runner.backpressure import BackPressure
from projector.runner.batch import (
    BatchApplier,
    BatchResult,
    Clock,
    Decoded,
    decode_all,
)
from projector.runner.correlate_step import CorrelationStep
from projector.runner.gap_timer import GapTimer
from projector.runner.merge_batch import MergeApplier
from projector.runner.progress import PartitionProgress
from projector.source.kafka import KafkaSource, TopicPartition, consumer_config
from projector.store.base import Store
from projector.store.connect import open_store
from projector.store.errors import Fenced, NotPrepared, WriteConflict, is_transient

log = logging.getLogger(__name__)

SWEEP_SECONDS = 60.0  # how often merge projections look for tombstones past their retention
IDLE_TICK_SECONDS = 1.0  # at most this far apart: idle ticks of a correlation (real time)


def load_handlers(projection: ProjectionConfig) -> list[LoadedHandler]:
    """The projection's handlers; with a correlation, its rule is loaded too (to check it)
    and some handler must take the business events."""
    loaded = [load_handler(path, projection.mode) for path in projection.handlers]
    if projection.mode == "merge" and projection.merge.view_table and not loaded:
        loaded.append(document_view(projection.merge.view_table))
    if projection.correlation is not None:
        load_rule(projection.correlation.rule)
        outbox = projection.correlation.outbox
        if outbox is None and not any(h.business is not None for h in loaded):
            raise ValueError(
                f"projection {projection.name!r}: correlation: business events would reach"
                " nothing: define handle_business in a handler module or set"
                " correlation.outbox.topic"
            )
    return loaded


def build_correlation(
    projection: ProjectionConfig, handlers: list[LoadedHandler], clock: Clock
) -> CorrelationStep | None:
    """The projection's correlation step, if it has one (durations in event-time ms)."""
    c = projection.correlation
    if c is None:
        return None
    return CorrelationStep(
        correlation_rules(projection, load_rule(c.rule)),
        projection.correlation_topics,
        handlers,
        clock,
        lateness=round(c.lateness * 1000),
        idle_after=None if c.idle_after is None else round(c.idle_after * 1000),
        outbox=c.outbox,
    )


def build_decoders(projection: ProjectionConfig) -> dict[str, Decoder]:
    return {
        t: load_decoder(projection.decoder_for(t).kind, projection.decoder_for(t).options)
        for t in projection.consumed_topics
    }


Applier = BatchApplier | MergeApplier


def build_applier(
    config: Config, projection: ProjectionConfig, store: Store, clock: Clock
) -> Applier:
    """The projection's batch applier: sequence or merge, by its mode."""
    if projection.mode == "merge":
        rules = MergeRules(frozenset(projection.merge.delete_types), projection.merge.removed_field)
        handlers = load_handlers(projection)
        return MergeApplier(
            projection.name,
            projection.schema_name,
            store,
            handlers,
            rules,
            clock,
            projection.merge.tombstone_retention,
            build_correlation(projection, handlers, clock),
        )
    return BatchApplier(
        projection.name,
        projection.schema_name,
        store,
        load_handlers(projection),
        SequenceRules(projection.first_seq, projection.max_seq_jump),
        projection.gap_timeout,
        clock,
    )


@dataclass
class WorkerStats:
    """Running totals, for logs on exit (metrics come with the metrics module)."""

    batches: int = 0
    totals: dict[str, int] = field(default_factory=dict)

    def add(self, result: BatchResult) -> None:
        self.batches += 1
        for key in ("consumed", "applied", "duplicates", "parked", "ignored"):
            self.totals[key] = self.totals.get(key, 0) + getattr(result, key)
        self.totals["dead_letters"] = self.totals.get("dead_letters", 0) + len(result.dead_letters)


@dataclass(frozen=True)
class InFlight:
    """A batch applied but its commit not yet waited for: what landing it needs."""

    messages: list[RawMessage]
    result: BatchResult
    positions: dict[TopicPartition, int]
    epochs: dict[TopicPartition, int]  # as the batch was fenced with
    started: float
    decoded: Decoded | None  # for planning it again
    spans: dict[TopicPartition, PartitionSpan]  # what it read of each partition

    def owned(self, epochs: Mapping[TopicPartition, int]) -> set[TopicPartition]:
        """The batch's partitions still owned under the epoch it was fenced with."""
        return {tp for tp in self.spans if tp in epochs and epochs[tp] == self.epochs.get(tp)}

    def messages_of(self, partitions: set[TopicPartition]) -> list[RawMessage]:
        """The batch's messages of these partitions (all of them, usually: no copy)."""
        if len(partitions) == len(self.spans):
            return self.messages
        return [m for m in self.messages if (m.topic, m.partition) in partitions]


class ProjectionWorker:
    def __init__(
        self,
        config: Config,
        projection: ProjectionConfig,
        instance: str,
        stop: threading.Event,
        clock: Clock = time.time,
        exit_when_caught_up: bool = False,
        metrics: Metrics | None = None,
        first: bool = True,
    ):
        """``first``: the projection's first consumer in this process, which alone reports
        the projection-wide correlation gauges (the others would report the same figures)."""
        self.config = config
        self.metrics = metrics or Metrics()
        self.projection = projection
        self.instance = instance
        self.stop = stop
        self.clock = clock
        self.exit_when_caught_up = exit_when_caught_up
        self.store = open_store(config, projection)
        # The gap timer and back-pressure work on a connection of their own: on the batches'
        # they would wait for the commit in flight, and undo the batch built behind it.
        self.side_store = open_store(config, projection)
        self.applier = build_applier(config, projection, self.store, clock)
        self.decoders = build_decoders(projection)
        self.channel = open_channel(
            projection.replay, config.kafka.bootstrap_servers, config.kafka.producer
        )
        # Merge mode has no sequence, so no gaps to time.
        self.gap_timer = (
            GapTimer(
                projection,
                self.side_store,
                self.applier,
                self.channel,
                clock,
                self._count_requests,
            )
            if isinstance(self.applier, BatchApplier)
            else None
        )
        self.backpressure = BackPressure(projection, self.side_store, clock)
        self.progress = PartitionProgress()
        self.epochs: dict[TopicPartition, int] = {}
        self._in_flight: InFlight | None = None  # the batch whose commit is in flight
        self._retries: dict[int, Retrying] = {}  # see _retrying
        self.stats = WorkerStats()
        self.heartbeat = time.monotonic()  # real time: a stalled loop is a real-time matter
        self._next_sweep = 0.0
        self._next_idle_tick = 0.0  # time.monotonic()
        idle_after = projection.correlation.idle_after if projection.correlation else None
        self._idle_every = min(IDLE_TICK_SECONDS, (idle_after or IDLE_TICK_SECONDS * 4) / 4)
        self.metrics.gap_timeout.labels(projection.name).set(projection.gap_timeout)
        self._figures_store: Store | None = None
        # Shown in thread names and logs: which of the projection's consumers this is.
        self.suffix = "" if first else f"@{instance}"
        if projection.correlation is not None and first:
            self._watch_correlation(projection.correlation.lateness)

    def _watch_correlation(self, lateness: float) -> None:
        """The correlation's gauges, read at scrape time through a connection of their own."""
        store = self._figures_store = open_store(self.config, self.projection)
        name, topics = self.projection.name, self.projection.correlation_topics
        self.metrics.correlation_figures.clock = self.clock
        self.metrics.correlation_figures.add(
            name, lambda: store.correlation_figures(name, topics), store.close, lateness
        )

    # -- rebalance hooks (called inside poll) -------------------------------------------------
    def _claim(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int | None]:
        claims = self._retrying()(self.store.claim, self.projection.name, partitions, self.instance)
        self.epochs.update({tp: c.epoch for tp, c in claims.items()})
        self.progress.assignment_seen = True
        self.backpressure.forget_pauses(partitions)
        return {tp: c.next_offset for tp, c in claims.items()}

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.epochs.pop(tp, None)
        self.backpressure.forget_pauses(partitions)
        self.progress.revoked(partitions)
        self.metrics.forget_partitions(self.projection.name, partitions)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        kafka = self.config.kafka
        group = f"{kafka.group_prefix}.{self.projection.name}"
        conf = consumer_config(
            kafka.bootstrap_servers,
            group,
            self.instance,
            kafka.consumer,
            self.projection.batch_max_messages,
        )
        topics = self.projection.consumed_topics
        source = KafkaSource(conf, topics, self._claim, self._revoked)
        log.info(
            "projection %s: consuming %s as %s in group %s",
            self.projection.name,
            ", ".join(topics),
            self.instance,
            group,
        )
        try:
            while not self.stop.is_set():
                self.heartbeat = time.monotonic()
                self.metrics.last_loop.labels(self.projection.name).set_to_current_time()
                if self._step(source):
                    break
            self._land(source)
        finally:
            if self._in_flight is not None:  # leaving on an error: wait for it all the same
                self._in_flight = None
                try:
                    self.store.wait_commit()
                except Exception as exc:
                    log.warning(
                        "projection %s: the last batch did not commit (%s); it is read again"
                        " from the stored checkpoint at the next start",
                        self.projection.name,
                        exc,
                    )
            source.close()
            if self.channel is not None:
                self.channel.close()
            self.store.close()
            self.side_store.close()
            if self._figures_store is not None:
                self.metrics.correlation_figures.remove(self.projection.name)
                self._figures_store.close()
            log.info(
                "projection %s stopped after %d batches: %s",
                self.projection.name,
                self.stats.batches,
                self.stats.totals,
            )

    def _step(self, source: KafkaSource) -> bool:
        """One poll and its batch; True when the worker should stop (caught up, burst mode).

        The previous batch's commit may still be in flight (a pipelined batch): this batch is
        polled, decoded and planned meanwhile (on PostgreSQL, sent too, all but its COMMIT).
        Then the previous one lands (its Kafka offsets, its metrics) before this one's commit
        is sent. A batch that could not be prepared so is applied after the landing."""
        in_flight = self._in_flight is not None
        # In flight, only what is there already: waiting for more on a quiet topic would
        # delay the landing (Kafka offsets, metrics, readiness) by the poll's timeout.
        polled, decoded = self._poll(source, 0.0 if in_flight else None)
        ahead = in_flight and bool(polled) and self._pipelined and self.store.plans_ahead
        prepared = None
        if ahead:
            try:
                prepared = self._prepare(source, polled, decoded)
            except NotPrepared as exc:
                # A lost connection says so here (the landing may find the batch ahead
                # committed); the batch ahead's own failure is told where it lands.
                cause = exc.__cause__
                lost = isinstance(cause, Exception) and is_transient(cause)
                lost &= not isinstance(cause, WriteConflict)
                log.log(
                    logging.WARNING if lost else logging.INFO,
                    "projection %s: %s; applying it after that one",
                    self.projection.name,
                    exc,
                )
                ahead = False
        self._land(source)
        if in_flight and not polled:
            polled, decoded = self._poll(source, None)
        # Messages of a partition revoked during this poll are not ours to apply.
        idle = decoded is None or not any(tp in self.epochs for tp in decoded.spans)
        if idle:
            self._idle_tick(source)
        if self.gap_timer is not None:
            self._retrying(self.side_store)(self.gap_timer.tick)
        self._sweep_tombstones()
        self._retrying(self.side_store)(self.backpressure.update, source)
        self.metrics.backpressure.labels(self.projection.name).set(int(self.backpressure.active))
        if prepared is not None:
            self._send(source, prepared)
        elif not idle and not ahead:
            self._apply(source, polled, decoded)
        # A burst run ends when caught up with nothing left to wait for. Open gaps are
        # asked about first: while a replay can still fill them, the broker is not (its
        # exact lag waits behind each partition's fetch, ~0.1 s apiece, during which the
        # loop would neither apply replays nor send the requests falling due).
        ending = idle and self.exit_when_caught_up and self.progress.assignment_seen
        waiting = ending and self._waiting_for_replays()
        if self.progress.refresh(source, force=ending and not waiting):
            self.metrics.set_lag(self.projection.name, self.progress.lag, self.progress.ages())
        if not ending or waiting:
            return False
        return all(n == 0 for n in self.progress.lag.values())

    def _poll(
        self, source: KafkaSource, timeout: float | None
    ) -> tuple[list[RawMessage], Decoded | None]:
        """A batch and its messages decoded (``timeout``: the projection's poll_timeout)."""
        if timeout is None:
            timeout = self.projection.poll_timeout
        polled = source.poll(self.projection.batch_max_messages, timeout)
        return polled, decode_all(polled, self.decoders) if polled else None

    def _idle_tick(self, source: KafkaSource) -> None:
        """A correlation's windows close by an idle watermark too: when a poll brought
        nothing, at most every ``min(1 s, idle_after / 4)`` (always in a burst run, before it
        decides it is done), run the correlation step with no events."""
        applier = self.applier
        if not isinstance(applier, MergeApplier) or applier.correlation is None:
            return
        now = time.monotonic()
        if now < self._next_idle_tick and not self.exit_when_caught_up:
            return
        self._next_idle_tick = now + self._idle_every
        try:
            done = self._retrying()(applier.idle_tick, dict(self.epochs), self._caught_up(source))
        except Fenced as fenced:
            self._drop(source, fenced)
            return
        if done is not None:
            outcome, result = done
            self.metrics.record_correlation(self.projection.name, outcome)
            for letter in result.dead_letters:
                self.metrics.dead_letters.labels(self.projection.name, letter.kind).inc()

    def _caught_up(self, source: KafkaSource) -> set[TopicPartition]:
        """The correlation's owned partitions with nothing left to read (as /readyz sees it,
        from the end offsets the fetches brought back)."""
        applier = self.applier
        if not isinstance(applier, MergeApplier) or applier.correlation is None:
            return set()
        topics = applier.correlation.topics
        return {tp for tp, n in source.lag(cached=True).items() if n == 0 and tp[0] in topics}

    def _sweep_tombstones(self) -> None:
        """Merge mode: forget old tombstones, at most once a minute (by the daemon's clock)."""
        now = self.clock()
        if not isinstance(self.applier, MergeApplier) or now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_SECONDS
        swept, removed = self._retrying()(self.applier.sweep)
        if swept:
            log.info(
                "projection %s: swept the tombstones of %d document(s), %d deleted ones removed",
                self.projection.name,
                swept,
                removed,
            )

    def _record(
        self, spans: Mapping[TopicPartition, PartitionSpan], result: BatchResult, seconds: float
    ) -> None:
        """After the commit: totals, back-pressure count, progress and metrics."""
        self.stats.add(result)
        self.backpressure.observe(result)
        if self.gap_timer is not None and result.gaps_due is not None:
            self.gap_timer.expect(result.gaps_due)
        self.progress.applied(spans)
        self.metrics.record_batch(self.projection.name, result, seconds)
        if isinstance(self.applier, MergeApplier) and self.applier.correlated is not None:
            self.metrics.record_correlation(self.projection.name, self.applier.correlated)

    def _count_requests(self, outcome: str, count: int, skipped: BatchResult | None) -> None:
        if count:
            self.metrics.replay_requests.labels(self.projection.name, outcome).inc(count)
        if skipped is not None:
            self.metrics.record_gaps(self.projection.name, skipped)

    def ready(self) -> tuple[bool, str]:
        """Caught up within ready_max_lag, and no gap older than ready_max_gap_age."""
        ok, reason = self.progress.caught_up(self.config.metrics.ready_max_lag)
        return ok, f"{self.projection.name}: {reason}"

    def _waiting_for_replays(self) -> bool:
        """Open gaps a replay can still fill keep a burst run going."""
        return (
            self.channel is not None and self.side_store.count_open_gaps(self.projection.name) > 0
        )

    @property
    def _pipelined(self) -> bool:
        """Whether batches leave their commit in flight: sequence mode, on a store that can."""
        return isinstance(self.applier, BatchApplier) and self.store.commits_in_flight

    def _apply(
        self, source: KafkaSource, polled: list[RawMessage], decoded: Decoded | None
    ) -> None:
        """Apply a batch (the messages of partitions still owned), leaving its commit in
        flight where the store can (a sequence-mode batch); :meth:`_land` finishes it."""
        flight = self._prepare(source, polled, decoded)
        if flight is not None:
            self._send(source, flight)

    def _prepare(
        self, source: KafkaSource, polled: list[RawMessage], decoded: Decoded | None
    ) -> InFlight | None:
        """The batch applied up to its commit: sent already (PostgreSQL) or prepared (a
        store that plans ahead), or, not pipelined, committed."""
        started = time.monotonic()
        spans = decoded.spans if decoded is not None else partition_spans(polled)
        owned = [tp for tp in spans if tp in self.epochs]
        messages = polled
        if len(owned) != len(spans):
            spans = {tp: spans[tp] for tp in owned}
            messages = [m for m in polled if (m.topic, m.partition) in spans]
            decoded = None
        positions = source.positions(owned)
        epochs = dict(self.epochs)
        applied = self._applied(source, messages, decoded, positions, self._pipelined)
        if applied is None:
            return None
        if len(applied[0]) != len(messages):
            decoded = None
        return InFlight(*applied, positions, epochs, started, decoded, spans)

    def _send(self, source: KafkaSource, flight: InFlight | None) -> None:
        """Send the batch's commit if only prepared, and leave it in flight (landed at once
        when the batch was not pipelined). A batch planned ahead on what has changed since
        (the batch before it failed where it landed) is planned again first."""
        while flight is not None and not self.store.send_commit():
            log.info("projection %s: planning the batch again", self.projection.name)
            flight = self._prepare(source, flight.messages, flight.decoded)
        if flight is None:
            return
        self._in_flight = flight
        if not self._pipelined:
            self._land(source)

    def _applied(
        self,
        source: KafkaSource,
        messages: list[RawMessage],
        decoded: Decoded | None,
        positions: dict[TopicPartition, int],
        pipelined: bool,
    ) -> tuple[list[RawMessage], BatchResult] | None:
        """The batch applied (its commit in flight if ``pipelined``), transient errors retried,
        the partitions of a fence dropped: the messages applied and what they did."""
        apply: Callable[..., BatchResult] = (
            partial(self.applier.apply, caught_up=self._caught_up(source))
            if isinstance(self.applier, MergeApplier)
            else partial(self.applier.apply, pipelined=pipelined)
        )
        while messages:
            try:
                result = self._retrying()(
                    apply, messages, self.decoders, dict(self.epochs), positions, decoded=decoded
                )
                return messages, result
            except Fenced as fenced:
                lost = self._drop(source, fenced)
                messages = [m for m in messages if (m.topic, m.partition) not in lost]
                decoded = None
        return None

    def _land(self, source: KafkaSource) -> None:
        """Wait for the commit of the batch in flight, then commit its offsets to Kafka and
        record it. A commit that failed (a lost connection, a handler's write refused by the
        database) is applied again at once, step by step, where a handler error becomes a
        dead letter, but only for the partitions still owned under the same epoch: one
        claimed again since (in a rebalance during the poll) is read again from its stored
        checkpoint anyway."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        messages, result = flight.messages, flight.result
        try:
            self.store.wait_commit()
        except Exception as exc:
            conflict = isinstance(exc, WriteConflict)  # refused: certainly not committed
            if not conflict and self._committed_after_all(flight):
                log.warning(
                    "projection %s: the batch's commit was not answered (%s), but the store"
                    " holds it",
                    self.projection.name,
                    exc,
                )
            else:
                log.log(
                    logging.INFO if conflict else logging.WARNING,
                    "projection %s: the batch's commit failed (%s); applying it again",
                    self.projection.name,
                    exc,
                )
                messages = flight.messages_of(flight.owned(self.epochs))
                applied = self._applied(source, messages, None, flight.positions, False)
                if applied is None:
                    return
                messages, result = applied
        crash_point("after-commit")
        tps = flight.owned(self.epochs) & result.checkpoints.keys()
        source.commit({tp: n for tp, n in result.checkpoints.items() if tp in tps})
        self._record(
            {tp: flight.spans[tp] for tp in tps}, result, time.monotonic() - flight.started
        )

    def _committed_after_all(self, flight: InFlight) -> bool:
        """Whether a batch whose commit went unanswered (a connection lost after the server
        committed) is in the store all the same: its checkpoints are there. Only a batch's
        commit moves a checkpoint, and only forward; so the daemon counts the batch once
        instead of applying it again and counting its events as duplicates."""
        stored = self._retrying()(self.store.checkpoints, self.projection.name)
        return all(
            (stored.get(tp) or -1) >= offset for tp, offset in flight.result.checkpoints.items()
        )

    def _drop(self, source: KafkaSource, fenced: Fenced) -> set[TopicPartition]:
        """Partitions another instance owns now: forget their epochs and stop reading them
        (they are resumed if they are assigned here again)."""
        log.warning("projection %s: %s; dropping them", self.projection.name, fenced)
        lost = set(fenced.partitions)
        for tp in lost:
            self.epochs.pop(tp, None)
        source.pause(lost)
        return lost

    def _wait(self, seconds: float) -> None:
        self.stop.wait(seconds)  # a stop request cuts a backoff short

    def _retrying(self, store: Store | None = None) -> Retrying:
        """The worker's retry policy for work on ``store`` (the batches' by default), whose
        connection a transient error replaces: one object per store for the worker's life,
        used by its thread alone and never nested. A new one for each call left 16 objects
        of cyclic garbage (tenacity's actions refer back to their Retrying), three calls a
        loop turn: a daemon under a light load, turning often, gave Python's collector
        100,000 to walk every few seconds, and each such pause (130 ms, measured) delayed a
        batch."""
        store = store or self.store
        found = self._retries.get(id(store))
        if found is not None:
            return found

        def before_sleep(state: RetryCallState) -> None:
            exc = _failure(state)
            if isinstance(exc, WriteConflict):
                log.info("projection %s: %s", self.projection.name, exc)
                return
            log.warning(
                "projection %s: transient store error, retrying: %s", self.projection.name, exc
            )
            store.close()  # a fresh connection for the retry

        retrying = self._retries[id(store)] = Retrying(
            retry=retry_if_exception(is_transient),
            wait=retry_wait,
            stop=lambda _state: self.stop.is_set(),
            sleep=self._wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying


_BACKOFF = wait_exponential(multiplier=0.05, max=10)


def retry_wait(state: RetryCallState) -> float:
    """How long before a batch is tried again: at once (up to 10 ms of jitter) after a write
    conflict, which only says another writer was quicker; else exponentially longer, to 10 s,
    for a store in trouble. Measured: with backoff, a batch of one of two consumers on Redis
    holding a few replayed events of the other's busy streams lost more than ten times in a
    row and waited 36 s."""
    if isinstance(_failure(state), WriteConflict):
        return random.uniform(0.0, 0.01)
    return _BACKOFF(state)


def _failure(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None
