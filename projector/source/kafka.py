"""Kafka source: turns a consumer group's partitions into batches of :class:`RawMessage` and
offsets, and nothing else.

- One consumer group per projection, static membership (``group.instance.id``) so a restarted
  instance gets its partitions back at once instead of after the session timeout.
- Offsets are never auto-committed or auto-stored: the store's checkpoint is the truth, and
  :meth:`commit` is called only after the store transaction committed; it reaches Kafka at
  most once per ``COMMIT_INTERVAL``, and on revoke (close() revokes too).
- On assignment the ``on_assign`` hook claims the partitions in the store (a new epoch) and
  returns the stored checkpoints, which become the positions to read from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition

from projector.core.message import RawMessage

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
AssignHook = Callable[[list[TopicPartition]], Mapping[TopicPartition, int | None]]
RevokeHook = Callable[[list[TopicPartition]], None]


class SourceFatal(Exception):
    """The consumer cannot go on (e.g. fenced by a newer instance with the same instance id)."""


# librdkafka's own messages (a broker down, a failed fetch) go through projector's logging,
# with its level and format, instead of straight to stderr.
KAFKA_LOG = logging.getLogger("projector.kafka")


def client_logging() -> dict[str, Any]:
    """The setting that routes a Kafka client's log lines to projector's logging; every
    consumer and producer projector creates takes it."""
    return {"logger": KAFKA_LOG}


# How many messages librdkafka keeps fetched ahead per partition, in batches of the
# projection's batch_max_messages; and its bound in bytes for the whole consumer.
PREFETCH_BATCHES = 2
PREFETCH_KBYTES = 16 * 1024

# Seconds between offset commits to Kafka. They only tell Kafka's tools how far the store is
# (reading resumes at the store's checkpoint), and at low load a batch holds a few messages:
# committed after each one, ~500 commits a second (bench, Redis at 11k events/s) made the
# group coordinator fall behind, and close(), which waits for the commits in flight, took
# 34-60 s after SIGTERM, past a Kubernetes grace period.
COMMIT_INTERVAL = 1.0


def consumer_config(
    bootstrap: str,
    group: str,
    instance_id: str,
    extra: Mapping[str, Any],
    batch_max_messages: int,
) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "group.instance.id": instance_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A partition never read starts at its beginning (set explicitly on assignment); a
        # stored checkpoint that is out of range (records deleted under it) must stop the
        # projection loudly, never be silently reset to the earliest or latest offset.
        "auto.offset.reset": "error",
        # Transactional producers' aborted messages must never reach a view.
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        # A broker query (end offsets for lag) waits behind an in-flight fetch on the same
        # connection; librdkafka's 500 ms default made each such query that slow.
        "fetch.wait.max.ms": 100,
        # librdkafka waits this long before fetching again for a partition whose local queue
        # was full; its 1 s default stalls a consumer that empties the queue quickly.
        "fetch.queue.backoff.ms": 10,
        # librdkafka prefetches up to 100,000 messages per partition (64 MB) by default, and
        # its queue is first in, first out across partitions: behind a backlog, a replayed
        # event waited for seconds behind what was fetched of the source topic before it,
        # and every later event of its stream was parked meanwhile (bench: peak RSS 145 ->
        # 96 MB, reordered run to the topic's end 0.65 -> 0.88 of in order, at 300k events).
        # A couple of batches ahead keeps the next batch ready.
        "queued.min.messages": max(1000, PREFETCH_BATCHES * batch_max_messages),
        "queued.max.messages.kbytes": PREFETCH_KBYTES,
        # A topic created after the daemon started (or new partitions) is noticed within
        # seconds rather than librdkafka's default five minutes.
        "topic.metadata.refresh.interval.ms": 10_000,
        # A member learns of a rebalance (an instance joining) from its next heartbeat: with
        # librdkafka's 3 s default a second instance started beside a busy one stayed idle
        # for 3.1 s in the bench; 1 s keeps that wait short (the session timeout is 45 s).
        "heartbeat.interval.ms": 1000,
        "client.id": f"projector-{instance_id}",
        **client_logging(),
    }
    conf.update(extra)
    return conf


def _raw(msg: Message) -> RawMessage:
    # Once per message: positional arguments, and no work for the usual message without headers.
    ts_type, ts = msg.timestamp()
    raw_headers = msg.headers()
    headers: tuple[tuple[str, bytes | None], ...] = ()
    if raw_headers:
        pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
        headers = tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)
    return RawMessage(
        msg.topic() or "",
        msg.partition() or 0,
        msg.offset() or 0,
        msg.key(),
        msg.value(),
        ts if ts_type != 0 else None,
        headers,
    )


def _available(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    messages = consumer.consume(num_messages=max_messages, timeout=0)
    if messages:
        return messages
    first = consumer.poll(timeout)
    if first is None:
        return []
    if max_messages == 1:
        return [first]
    return [first, *consumer.consume(num_messages=max_messages - 1, timeout=0)]


class KafkaSource:
    def __init__(
        self,
        conf: Mapping[str, Any],
        topics: list[str],
        on_assign: AssignHook,
        on_revoke: RevokeHook,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._consumer = Consumer(dict(conf))
        self._clock = clock
        self._uncommitted: dict[TopicPartition, int] = {}  # offsets not sent to Kafka yet
        self._next_commit = 0.0
        # Under the cooperative protocol a rebalance hands out and takes back only the
        # partitions that move, and librdkafka refuses a whole-assignment assign().
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self.assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        # Next offset to read per assigned partition (None: from the beginning), for lag.
        self._next: dict[TopicPartition, int | None] = {}
        self._consumer.subscribe(
            topics, on_assign=self._assign_cb, on_revoke=self._revoke_cb, on_lost=self._revoke_cb
        )

    def _assign_cb(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        checkpoints = self._on_assign(tps)
        for p in partitions:
            stored = checkpoints.get((p.topic, p.partition))
            p.offset = OFFSET_BEGINNING if stored is None else stored
        if self._cooperative:
            consumer.incremental_assign(partitions)
            self.assigned |= set(tps)
            self._next.update({tp: checkpoints.get(tp) for tp in tps})
        else:
            consumer.assign(partitions)
            self.assigned = set(tps)
            self._next = {tp: checkpoints.get(tp) for tp in tps}
        # librdkafka keeps an application's pause across a revoke and a new assign: a
        # partition fenced (and paused) here, or paused by back-pressure, and assigned back
        # would never be read again. It starts unpaused; back-pressure pauses it if it must.
        consumer.resume(partitions)
        self._paused -= set(tps)
        log.info("assigned %s", ", ".join(f"{t}[{p}]" for t, p in sorted(tps)) or "nothing")

    def _revoke_cb(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._send_commit(set(tps))
        self.assigned -= set(tps)
        self._paused -= set(tps)
        for tp in tps:
            self._next.pop(tp, None)
        self._on_revoke(tps)
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(tps)) or "nothing")

    def poll(self, max_messages: int, timeout: float) -> list[RawMessage]:
        """Up to ``max_messages`` messages: what is there now, or else the first to arrive
        within ``timeout`` seconds and what came with it. Never waits for a batch to fill
        (``consume`` with a timeout would, the whole timeout, adding it to every event's
        latency whenever fewer than ``max_messages`` are waiting). Offsets held back by the
        commit interval go out here once it has passed, so an idle projection's committed
        offsets catch up with its store."""
        if self._uncommitted:
            self._commit_if_due()
        out: list[RawMessage] = []
        for msg in _available(self._consumer, max_messages, timeout):
            err = msg.error()
            if err is None:
                raw = _raw(msg)
                out.append(raw)
                self._next[(raw.topic, raw.partition)] = raw.offset + 1
            elif err.fatal() or err.code() == KafkaError._FENCED:
                raise SourceFatal(f"Kafka consumer cannot continue: {err.str()}")
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                raise SourceFatal(
                    f"the stored checkpoint of {msg.topic()}[{msg.partition()}] is out of range"
                    f" ({err.str()}): records were deleted under it, so events are missing."
                    " projector does not skip them silently: rebuild the projection"
                    " (projector rebuild, with --history-from where the history still is), or"
                    " move the checkpoint by hand if losing them is acceptable"
                )
            else:
                log.warning("Kafka: %s", err.str())
        return out

    def positions(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The consumer's next offsets, which step over transaction markers (control records
        the application never sees)."""
        tps = [KafkaTopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in self._consumer.position(tps)
            if tp.offset >= 0
        }

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Tell Kafka how far we are (after the store committed): sent at once if the last
        commit went ``COMMIT_INTERVAL`` ago, else by a later commit or poll, or on revoke.
        Best effort: the store's checkpoint, not this, decides where reading resumes."""
        self._uncommitted.update(offsets)
        self._commit_if_due()

    def _commit_if_due(self) -> None:
        if self._clock() >= self._next_commit:
            self._send_commit(self.assigned)

    def _send_commit(self, partitions: set[TopicPartition]) -> None:
        """Send the offsets not sent yet of ``partitions`` still assigned (asynchronously);
        those of partitions no longer assigned are dropped."""
        held = {tp: o for tp, o in self._uncommitted.items() if tp in self.assigned}
        tps = [KafkaTopicPartition(t, p, o) for (t, p), o in held.items() if (t, p) in partitions]
        self._uncommitted = {tp: o for tp, o in held.items() if tp not in partitions}
        if not tps:
            return
        self._next_commit = self._clock() + COMMIT_INTERVAL
        try:
            self._consumer.commit(offsets=tps, asynchronous=True)
        except KafkaException as exc:
            log.warning("Kafka offset commit failed (the store's checkpoint stands): %s", exc)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        tps = [KafkaTopicPartition(t, p) for t, p in partitions]
        if tps:
            self._consumer.pause(tps)
            self._paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        tps = [KafkaTopicPartition(t, p) for t, p in partitions]
        if tps:
            self._consumer.resume(tps)
            self._paused -= {(tp.topic, tp.partition) for tp in tps}

    def lag(self, cached: bool = True) -> dict[TopicPartition, int]:
        """Per assigned partition: end offset minus the next offset to read (0 when caught up).
        ``cached`` uses the end offsets of the last fetch responses (free); otherwise the broker
        is asked, which waits behind an in-flight fetch (up to fetch.wait.max.ms) per partition.
        A partition not fetched yet is always asked about, and so is a paused one: it is not
        fetched, so its last fetch's end offset would hide what arrived since."""
        out: dict[TopicPartition, int] = {}
        tps = [KafkaTopicPartition(t, p) for t, p in sorted(self.assigned)]
        for tp in self._consumer.position(tps) if tps else []:
            key = (tp.topic, tp.partition)
            low, high = (
                self._consumer.get_watermark_offsets(tp, cached=True)
                if cached and key not in self._paused
                else (-1, -1)
            )
            if high < 0:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            # librdkafka's position also steps over transaction markers, which our own count
            # of consumed messages cannot see.
            candidates = [o for o in (self._next.get(key), tp.offset) if o is not None and o >= 0]
            out[key] = max(0, high - max(candidates, default=low))
        return out

    def close(self) -> None:
        # With static membership close() does not leave the group: a restart within the session
        # timeout gets the same partitions back without a rebalance.
        self._consumer.close()  # its revoke sends the offsets not sent yet


class PartitionReader:
    """Reads every partition of some topics from given offsets, assigned by hand rather than
    by a consumer group (a rebuild reads the whole history; its progress is kept in the store,
    never committed to Kafka)."""

    def __init__(self, conf: Mapping[str, Any], topics: list[str]) -> None:
        # Never skip silently: a stored offset out of range is an error, not a reset.
        self._consumer = Consumer(
            {
                **conf,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "error",
            }
        )
        self.partitions: list[TopicPartition] = []
        for topic in topics:
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                reason = "no such topic" if meta is None else meta.error.str()
                raise SourceFatal(f"topic {topic!r} cannot be read: {reason}")
            self.partitions += [(topic, p) for p in sorted(meta.partitions)]

    def watermarks(self) -> dict[TopicPartition, tuple[int, int]]:
        """(low, high) per partition: the first offset still held, and the next to be written."""
        return {
            (t, p): self._consumer.get_watermark_offsets(
                KafkaTopicPartition(t, p), timeout=10, cached=False
            )
            for t, p in self.partitions
        }

    def assign(self, offsets: Mapping[TopicPartition, int | None]) -> None:
        """Start each partition at its offset (None: from the beginning)."""
        tps = []
        for t, p in self.partitions:
            offset = offsets.get((t, p))
            tps.append(KafkaTopicPartition(t, p, OFFSET_BEGINNING if offset is None else offset))
        self._consumer.assign(tps)

    def poll(self, max_messages: int, timeout: float) -> list[RawMessage]:
        out: list[RawMessage] = []
        for msg in _available(self._consumer, max_messages, timeout):
            err = msg.error()
            if err is None:
                out.append(_raw(msg))
            elif err.fatal() or err.code() == KafkaError._AUTO_OFFSET_RESET:
                raise SourceFatal(
                    f"Kafka: cannot read {msg.topic()}[{msg.partition()}]: {err.str()}"
                )
            else:
                log.warning("Kafka: %s", err.str())
        return out

    def positions(self) -> dict[TopicPartition, int]:
        """The next offsets to read (past transaction markers), where known."""
        tps = [KafkaTopicPartition(t, p) for t, p in self.partitions]
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in self._consumer.position(tps)
            if tp.offset >= 0
        }

    def close(self) -> None:
        self._consumer.close()
