"""The outbox publisher (docs/correlation.md, section 7): a projection's queued business events
go to their Kafka topic, at least once, each with its stable id in a header.

One publisher per projection at a time: each instance runs one (a thread of the daemon), and
the one holding the store's publishing lock (PostgreSQL: a session advisory lock on its own
connection; Redis: a lease, ``SET NX PX``, renewed by each round's read) publishes while the
others only try the lock again now and then; per-key order holds because one producer sends
the rows in queue order. A round, in order:

1. read the oldest ``max_batch`` pending rows;
2. produce each with the idempotent producer (``enable.idempotence``, ``acks=all``): key the
   row's ``msg_key``, value the event's JSON, headers ``projector-event-id`` (the stable id to
   de-duplicate on), ``projector-event-type``, ``projector-projection``;
3. ``flush``, which waits for every delivery report (``message.timeout.ms`` bounds it);
4. mark the delivered rows published (crash point ``outbox-after-flush`` just before: a crash
   there publishes them again, with the same ids).

Failed deliveries stay pending and are retried after a backoff (tenacity's exponential
wait, computed, waited on the stop event, so a shutdown cuts it short), counted by outcome.
Published rows are kept for ``retention`` (the ``unique`` then absorbs a business event closed
again) and deleted by a sweep, by the runner's clock. Nothing here runs in a batch transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from tenacity import RetryCallState, wait_exponential

from projector.config import Config, ConfigError, OutboxConfig, ProjectionConfig
from projector.core import json_codec
from projector.faults import crash_point
from projector.metrics import Metrics
from projector.source.kafka import client_logging
from projector.store.base import OutboxRow, OutboxStore
from projector.store.connect import open_store
from projector.store.errors import is_transient
from projector.store.postgres import PostgresStore
from projector.store.postgres_outbox import PgOutbox
from projector.store.redis import RedisStore
from projector.store.redis_outbox import RedisOutbox

log = logging.getLogger(__name__)

Clock = Callable[[], float]

POLL_SECONDS = 0.25  # between rounds while nothing is pending
LOCK_RETRY_SECONDS = 5.0  # how often an instance not publishing tries the lock again
SWEEP_SECONDS = 60.0  # how often the publisher deletes published rows past the retention
DELIVERY_TIMEOUT = 30.0  # message.timeout.ms: a delivery report comes within this
MAX_BACKOFF = 60.0

HEADER_ID = "projector-event-id"
HEADER_TYPE = "projector-event-type"
HEADER_PROJECTION = "projector-projection"


def producer_config(
    bootstrap: str, extra: Mapping[str, Any], delivery_timeout: float = DELIVERY_TIMEOUT
) -> dict[str, Any]:
    """The producer's settings: the operator's ``kafka.producer`` (SASL, TLS...) as the replay
    channel takes them, then what the outbox's guarantees need, which they cannot turn off."""
    return {
        "bootstrap.servers": bootstrap,
        "linger.ms": 5,
        **client_logging(),
        **extra,
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": max(1000, int(delivery_timeout * 1000)),
    }


def open_outbox(config: Config, projection: ProjectionConfig) -> OutboxStore:
    """A new connection to the projection's outbox. On Redis the publishing lease's token is
    the configured ``kafka.instance_id`` when there is one, so a restarted instance takes its
    own lease back at once (two live instances with one id are fenced by Kafka anyway)."""
    store = open_store(config, projection)
    if isinstance(store, RedisStore):
        return RedisOutbox(store, projection.name, owner=config.kafka.instance_id)
    if not isinstance(store, PostgresStore):
        store.close()
        raise ConfigError(f"projection {projection.name!r}: this store has no outbox")
    return PgOutbox(store, projection.name)


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failed rounds in a row (1-based)."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = failures
    return float(wait_exponential(multiplier=0.5, max=MAX_BACKOFF)(state))


class OutboxPublisher:
    """One projection's publisher; ``run`` is a thread's target, ``turn`` one step of it."""

    def __init__(
        self,
        projection: str,
        outbox: OutboxConfig,
        store: OutboxStore,
        producer_conf: Mapping[str, Any],
        halt: threading.Event,
        clock: Clock = time.time,
        metrics: Metrics | None = None,
        figures: OutboxStore | None = None,
        drain: bool = False,
        lock_retry: float = LOCK_RETRY_SECONDS,
    ):
        self.projection = projection
        self.outbox = outbox
        self.store = store
        self.halt = halt  # set: stop after the current round
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.drain = drain  # burst runs: publish what is pending before returning
        self.holding = False
        self.lock_retry = lock_retry
        self._figures = figures
        self._conf = dict(producer_conf)
        self._producer: Producer | None = None
        self._failures = 0
        self._next_sweep = 0.0
        timeout = float(self._conf.get("message.timeout.ms", DELIVERY_TIMEOUT * 1000)) / 1000
        self._flush_timeout = timeout + 5.0

    # -- the thread -----------------------------------------------------------------------
    def run(self) -> None:
        if self._figures is not None:
            f = self._figures
            self.metrics.outbox_figures.add(self.projection, f.figures, f.close)
        try:
            while not self.halt.is_set():
                self.halt.wait(self.turn())
            if self.drain:
                self._drain()
        finally:
            self.close()

    def close(self) -> None:
        if self._figures is not None:
            self.metrics.outbox_figures.remove(self.projection)
            self._figures.close()
        if self._producer is not None:
            self._producer.flush(self._flush_timeout)
            self._producer = None
        if self.holding:
            self.store.unlock()
            self.holding = False
        self.store.close()

    def turn(self) -> float:
        """Take the lock if free, publish one round and sweep; returns the seconds to wait
        before the next turn (0: more is pending)."""
        try:
            if not self._lock():
                return self.lock_retry
            delivered, failed = self.publish_round()
            self.sweep()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._lost_store(exc)
            return self._failed()
        if failed:
            return self._failed()
        self._failures = 0
        return 0.0 if delivered >= self.outbox.max_batch else POLL_SECONDS

    def _lock(self) -> bool:
        if not self.holding:
            self.holding = self.store.try_lock()
            if self.holding:
                log.info(
                    "outbox of %s: this instance publishes to %s",
                    self.projection,
                    self.outbox.topic,
                )
        return self.holding

    def _lost_store(self, exc: BaseException) -> None:
        """A store error: the lock went with the session; take it again on a new one."""
        log.warning("outbox of %s: store error, publishing paused: %s", self.projection, exc)
        self.metrics.outbox_errors.labels(self.projection, "store").inc()
        self.holding = False
        self.store.close()

    def _failed(self) -> float:
        self._failures += 1
        return backoff(self._failures)

    def _drain(self) -> None:
        """Publish until nothing is pending (a burst run's end), unless a round fails."""
        while self._lock():
            try:
                delivered, failed = self.publish_round()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._lost_store(exc)
                return
            if failed or delivered < self.outbox.max_batch:
                return

    # -- a round ----------------------------------------------------------------------------
    def publish_round(self) -> tuple[int, int]:
        """Steps 1 to 4 of the module docstring; returns (delivered, failed)."""
        rows = self.store.pending(self.outbox.max_batch)
        if not rows:
            return 0, 0
        errors = self._produce(rows)
        crash_point("outbox-after-flush")
        delivered = [r.seq for r in rows if r.seq in errors and errors[r.seq] is None]
        self.store.mark_published(delivered, self.clock())
        if delivered:
            self.metrics.outbox_published.labels(self.projection).inc(len(delivered))
        failed = len(rows) - len(delivered)
        for outcome in (o for o in errors.values() if o is not None):
            self.metrics.outbox_errors.labels(self.projection, outcome).inc()
        if failed:
            log.warning(
                "outbox of %s: %d of %d business event(s) not delivered to %s; retrying",
                self.projection,
                failed,
                len(rows),
                self.outbox.topic,
            )
        return len(delivered), failed

    def _produce(self, rows: Sequence[OutboxRow]) -> dict[int, str | None]:
        """Produce and flush; per row seq, ``None`` (delivered) or the failure's outcome. A
        row with no report (it never left) is absent."""
        producer = self._producer or Producer(self._conf)
        self._producer = producer
        errors: dict[int, str | None] = {}
        fatal = False

        for row in rows:

            def report(err: KafkaError | None, _msg: Message, seq: int = row.seq) -> None:
                nonlocal fatal
                errors[seq] = None if err is None else _outcome(err)
                fatal = fatal or (err is not None and err.fatal())

            self._send(producer, row, report)
        producer.flush(self._flush_timeout)
        if fatal:  # an idempotent producer's fatal error: it can't be used again
            log.error("outbox of %s: the producer hit a fatal error; a new one", self.projection)
            self._producer = None
        return errors

    def _send(
        self,
        producer: Producer,
        row: OutboxRow,
        report: Callable[[KafkaError | None, Message], None],
    ) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            (HEADER_ID, row.event_id.encode()),
            (HEADER_TYPE, str(row.event.get("type", "")).encode()),
            (HEADER_PROJECTION, self.projection.encode()),
        ]
        value = json_codec.dumps(row.event)
        while True:
            try:
                producer.produce(
                    row.topic,
                    value=value,
                    key=row.key.encode(),
                    headers=headers,
                    on_delivery=report,
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)

    # -- retention ----------------------------------------------------------------------------
    def sweep(self) -> int:
        """Delete rows published longer than ``retention`` ago, at most every minute (by the
        runner's clock); returns how many."""
        now = self.clock()
        if now < self._next_sweep:
            return 0
        swept = self.store.sweep(now - self.outbox.retention)
        # A full sweep leaves more: go on next turn.
        self._next_sweep = now if swept >= 5000 else now + SWEEP_SECONDS
        if swept:
            log.info("outbox of %s: deleted %d published row(s)", self.projection, swept)
        return swept


def _outcome(err: KafkaError) -> str:
    """A bounded label for a delivery failure."""
    return "timeout" if err.code() == KafkaError._MSG_TIMED_OUT else "delivery"


def build_publisher(
    config: Config,
    projection: ProjectionConfig,
    halt: threading.Event,
    clock: Clock,
    metrics: Metrics,
    drain: bool = False,
) -> OutboxPublisher | None:
    """The projection's publisher, if its correlation has an outbox."""
    c = projection.correlation
    if c is None or c.outbox is None:
        return None
    kafka = config.kafka
    return OutboxPublisher(
        projection.name,
        c.outbox,
        open_outbox(config, projection),
        producer_config(kafka.bootstrap_servers, kafka.producer),
        halt,
        clock,
        metrics,
        figures=open_outbox(config, projection),
        drain=drain,
    )
