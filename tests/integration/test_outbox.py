"""The outbox (issue 12, docs/correlation.md slice 3) against real Kafka and PostgreSQL: the
business events a correlation closes are queued in the batch's transaction, once per id, and
published to the outbox topic at least once with their stable id in a header, by one
publisher per projection; a rebuild's batches hold theirs aside; published rows are swept
after the retention."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from projector.cdc_scenario import Transaction, school_log
from projector.config import Config, parse_config
from projector.core.event import Event
from projector.core.message import RawMessage
from projector.metrics import Metrics
from projector.runner.batch import BatchResult
from projector.runner.outbox import OutboxPublisher, producer_config
from projector.runner.worker import build_applier, build_decoders
from projector.store.base import OutboxMessage
from projector.store.connect import open_store
from projector.store.postgres import PostgresStore
from projector.store.postgres_outbox import PgOutbox
from tests.conftest import Services, unique
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import (
    config_dict,
    daemon_process,
    migrate_all,
    rows,
    write_config,
)
from tests.integration.test_correlation import (
    TABLES,
    Clock,
    change_message,
    end_message,
    enrolments,
    expected_business,
    make,
    projection,
    retimed,
    run_burst,
    send,
    tx_ms,
)

pytestmark = pytest.mark.integration

HANDLERS = ["tests.integration.business_log"]


@pytest.fixture
def topics(new_topic: Callable[..., str]) -> dict[str, str]:
    """A topic per table, the transaction topic, and the outbox topic (fresh names)."""
    made = {name: new_topic(partitions=2) for name in (*TABLES, "transaction")}
    return {**made, "outbox": new_topic(partitions=2)}


def with_outbox(
    topics: dict[str, str], correlation: dict[str, Any] | None = None, **outbox: Any
) -> dict[str, Any]:
    """The school projection of test_correlation (``correlation`` updating its section), its
    business events also published."""
    proj = projection(topics, HANDLERS, window="60s", idle_after="1h", **(correlation or {}))
    proj["correlation"]["outbox"] = {"topic": topics["outbox"], **outbox}
    return proj


Published = tuple[bytes | None, dict[str, Any], dict[str, str]]  # key, value, headers


def read_topic(services: Services, topic: str) -> list[Published]:
    """Every message of ``topic``, from the beginning to its current end, in partition order."""
    consumer = Consumer(
        {"bootstrap.servers": services.kafka, "group.id": unique("g"), "enable.auto.commit": False}
    )
    try:
        parts = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
        left = {p: end for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[Published] = []
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            value, key, offset = msg.value(), msg.key(), msg.offset()
            assert isinstance(value, bytes) and offset is not None
            pairs: list[tuple[str, Any]] = list(msg.headers() or [])  # type: ignore[arg-type]
            headers = {k: bytes(v).decode() for k, v in pairs if v is not None}
            event = Event.from_json(json.loads(value)).to_json()
            out.append((key if isinstance(key, bytes) else None, event, headers))
            if offset + 1 >= left.get(msg.partition() or 0, 0):
                left.pop(msg.partition() or 0, None)
        assert not left, f"could not read {topic} to its end"
        return out
    finally:
        consumer.close()


def outbox_rows(pg_dsn: str) -> list[tuple[Any, ...]]:
    return rows(
        pg_dsn,
        "select projection, event_id, status, msg_key, event from projector.outbox order by seq",
    )


def logged_events(pg_dsn: str) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """What the business handler was handed: (id, type, stream, data, meta) per event."""
    return [
        (r[0], r[1], r[2], r[3], r[4])
        for r in rows(
            pg_dsn, "select id, type, stream, data, meta from school.business_log order by n"
        )
    ]


def test_business_events_are_published_with_their_id_header(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> None:
    """Proves publishing end to end: the school scenario's log (enrolments, moves, updates,
    deletions, with END records) run through the daemon; every business event the rule names
    is on the outbox topic exactly once (no crash here), its value the very event the handler
    was handed (id, type, stream, data, meta), keyed by its stream, with the headers
    ``projector-event-id`` (its id), ``projector-event-type`` and ``projector-projection``. The
    outbox rows are all published, and the counters say so."""
    log = school_log(random.Random(4), changes=150)
    config = make(services, pg_dsn, with_outbox(topics))
    send(services, [change_message(topics, c) for tx in log for c in tx.changes])
    send(services, [end_message(topics, tx) for tx in log])
    metrics = run_burst(config, Clock(tx_ms(log[0]) / 1000))

    expected = sorted(expected_business(log))
    handed = logged_events(pg_dsn)
    assert sorted((i, t) for i, t, *_ in handed) == expected
    published = read_topic(services, topics["outbox"])
    assert sorted((v["id"], v["type"]) for _, v, _ in published) == expected
    by_id = {v["id"]: (key, v, h) for key, v, h in published}
    for event_id, kind, stream, data, meta in handed:
        key, value, headers = by_id[event_id]
        assert (value["type"], value["stream"], value["data"], value["meta"]) == (
            kind,
            stream,
            data,
            meta,
        )
        assert key == stream.encode()
        assert headers == {
            "projector-event-id": event_id,
            "projector-event-type": kind,
            "projector-projection": "school",
        }
    assert {status for _, _, status, _, _ in outbox_rows(pg_dsn)} == {"published"}
    assert _count(metrics.outbox_published) == len(expected)
    assert _count(metrics.outbox_errors) == 0


def _count(counter: Any) -> float:
    """A counter's total over its labels."""
    return float(
        sum(s.value for f in counter.collect() for s in f.samples if s.name.endswith("_total"))
    )


# -- batches applied in-process, without Kafka -------------------------------------------------


def raw_messages(
    topics: dict[str, str], txs: Sequence[Transaction], start: int = 0
) -> list[RawMessage]:
    """The transactions' changes and END records as consumed messages, all on partition 0,
    offsets from ``start`` per topic."""
    out: list[RawMessage] = []
    offsets: dict[str, int] = {}
    wire = [change_message(topics, c) for tx in txs for c in tx.changes]
    wire += [end_message(topics, tx) for tx in txs]
    for topic, key, value in wire:
        offset = offsets.get(topic, start)
        offsets[topic] = offset + 1
        out.append(RawMessage(topic, 0, offset, key, value))
    return out


class DirectBatches:
    """The projection's merge applier under ``name`` (the live name, or a rebuild's), applying
    given messages as batches in this process, on the projection's store."""

    def __init__(self, config: Config, name: str, clock: Clock) -> None:
        live = config.projections[0]
        assert live.correlation is not None
        # As a rebuild applies it (runner/rebuild.py): its state under ``name``, its
        # correlation under the live name (the prefix of the business ids).
        correlation = live.correlation.model_copy(update={"name": live.name})
        update = {"name": name, "view_schema": live.schema_name, "correlation": correlation}
        shadow = live.model_copy(update=update)
        self.store = open_store(config, live)
        self.applier = build_applier(config, shadow, self.store, clock)
        self.decoders = build_decoders(live)
        self.name = name

    def apply(self, messages: Sequence[RawMessage]) -> BatchResult:
        partitions = sorted({(m.topic, m.partition) for m in messages})
        claims = self.store.claim(self.name, partitions, "test")
        epochs = {tp: c.epoch for tp, c in claims.items()}
        return self.applier.apply(messages, self.decoders, epochs)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def direct(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> Iterator[Callable[..., DirectBatches]]:
    made: list[DirectBatches] = []

    def make_direct(
        name: str = "school", correlation: dict[str, Any] | None = None, **outbox: Any
    ) -> DirectBatches:
        config = make(services, pg_dsn, with_outbox(topics, correlation, **outbox))
        batches = DirectBatches(config, name, Clock(time.time()))
        made.append(batches)
        return batches

    yield make_direct
    for batches in made:
        batches.close()


def test_a_business_event_closed_twice_is_queued_once(
    pg_dsn: str, topics: dict[str, str], direct: Callable[..., DirectBatches]
) -> None:
    """Proves the outbox's de-duplication in the batch transaction: four enrolment
    transactions applied as one batch queue four pending rows (key: the business event's
    id, as configured); the same batch re-delivered queues nothing (its parts are duplicates);
    and with the correlation records forgotten, the batch closes every window again (the
    handler is handed each business event a second time, with the same ids) while the outbox
    keeps one row per id (``on conflict do nothing``)."""
    txs = enrolments(school_log(random.Random(5), changes=300), 4)
    batches = direct(key="id")
    messages = raw_messages(topics, txs)
    batches.apply(messages)
    first = outbox_rows(pg_dsn)
    ids = sorted(i for i, _ in expected_business(txs))
    assert sorted(i for _, i, *_ in first) == ids
    assert {(p, s) for p, _, s, _, _ in first} == {("school", "pending")}
    assert all(key == event_id for _, event_id, _, key, _ in first)

    batches.apply(messages)
    assert outbox_rows(pg_dsn) == first

    rows(pg_dsn, "delete from projector.correlations returning key")
    batches.apply(messages)
    assert sorted(i for i, *_ in logged_events(pg_dsn)) == sorted(ids + ids)
    assert outbox_rows(pg_dsn) == first


def test_a_rebuilds_batches_hold_their_business_events(
    pg_dsn: str, topics: dict[str, str], direct: Callable[..., DirectBatches]
) -> None:
    """Proves a rebuild does not publish: batches applied under the rebuild's name
    (``school#rebuild``) write ``held`` rows under that name, no pending row at all, each with
    the event's JSON and its correlation key in ``meta.key`` (for the swap's hand-off); and the
    held rows further than ``window + closed_retention`` behind the watermark are pruned when a
    later transaction moves every input partition past them."""
    early, late = enrolments(school_log(random.Random(6), changes=300), 2)
    t = tx_ms(early)
    late = retimed(late, t + 3_600_000)
    batches = direct(name="school#rebuild", correlation={"closed_retention": "1s"})
    batches.apply(raw_messages(topics, [early]))
    [(name, event_id, status, key, event)] = outbox_rows(pg_dsn)
    assert (name, status) == ("school#rebuild", "held")
    assert event_id == expected_business([early])[0][0]
    assert event["meta"]["key"] == str(early.tx_id)
    assert key == event["stream"]
    assert rows(pg_dsn, "select count(*) from projector.outbox where status <> 'held'") == [(0,)]

    batches.apply(raw_messages(topics, [late], start=10))
    assert [(s, i) for _, i, s, _, _ in outbox_rows(pg_dsn)] == [
        ("held", expected_business([late])[0][0])
    ]


# -- the publisher -----------------------------------------------------------------------------


def queue(
    pg_dsn: str, topic: str, count: int, start: int = 0, projection: str = "school"
) -> list[str]:
    """Queue ``count`` business events directly (as a batch would); returns their ids."""
    events = [
        Event(
            f"student:{n}",
            None,
            1_000 + n,
            "update",
            {"n": n},
            f"school:tx{n}:abc",
            None,
            {"key": f"tx{n}"},
        )
        for n in range(start, start + count)
    ]
    store = PostgresStore(pg_dsn)
    try:
        with store.batch(projection, "school") as tx:
            tx.write_outbox([OutboxMessage(e, topic, e.stream) for e in events])
    finally:
        store.close()
    return [e.id for e in events]


def publisher(
    services: Services, pg_dsn: str, topic: str, clock: Clock | None = None, **outbox: Any
) -> OutboxPublisher:
    config = parse_config(
        config_dict(services, pg_dsn, [with_outbox({**_names(), "outbox": topic}, None, **outbox)]),
        env={},
    )
    c = config.projections[0].correlation
    assert c is not None and c.outbox is not None
    return OutboxPublisher(
        "school",
        c.outbox,
        PgOutbox(PostgresStore(pg_dsn), "school"),
        producer_config(services.kafka, {}),
        threading.Event(),
        clock or time.time,
        Metrics(),
        lock_retry=0.2,
    )


def _names() -> dict[str, str]:
    """Topic names for a config whose source topics are never read."""
    return {name: f"unused.{name}" for name in (*TABLES, "transaction", "outbox")}


def published_count(pg_dsn: str) -> int:
    [(n,)] = rows(pg_dsn, "select count(*) from projector.outbox where status = 'published'")
    return int(n)


def test_one_publisher_at_a_time(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves one publisher per projection: two publishers run side by side on the same
    outbox; only one takes the lock, publishes everything (each id once, in queue order on a
    one-partition topic: nothing interleaved) while the other publishes nothing. When the
    holder stops, the other takes the lock over and publishes what is queued next."""
    make(services, pg_dsn, with_outbox(_names()))  # the schema
    topic = new_topic(partitions=1)
    pubs = [publisher(services, pg_dsn, topic, max_batch=7) for _ in range(2)]
    threads = [threading.Thread(target=p.run) for p in pubs]
    ids = queue(pg_dsn, topic, 30)
    try:
        for t in threads:
            t.start()
        wait_until(lambda: published_count(pg_dsn) == 30, "the first 30 to be published")
        wait_until(lambda: sum(p.holding for p in pubs) == 1, "one holder")
        holder, idle = (0, 1) if pubs[0].holding else (1, 0)
        assert _count(pubs[idle].metrics.outbox_published) == 0
        pubs[holder].halt.set()
        threads[holder].join(30)
        more = queue(pg_dsn, topic, 5, start=30)
        wait_until(lambda: published_count(pg_dsn) == 35, "the next 5, by the other one")
        assert pubs[idle].holding
        assert _count(pubs[idle].metrics.outbox_published) == 5
    finally:
        for p in pubs:
            p.halt.set()
        for t in threads:
            t.join(30)
    assert [h["projector-event-id"] for _, _, h in read_topic(services, topic)] == ids + more


def test_published_rows_are_swept_after_the_retention(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the retention sweep, by the publisher's injected clock: rows published at T are
    kept until T + retention, then deleted at the next sweep, while rows published later and
    rows still pending stay. The outbox gauges, read at scrape time, count the pending rows."""
    make(services, pg_dsn, with_outbox(_names()))
    topic = new_topic(partitions=1)
    clock = Clock(1_800_000_000.0)
    pub = publisher(services, pg_dsn, topic, clock, retention="1d")
    try:
        queue(pg_dsn, topic, 3)
        assert pub.turn() > 0 and published_count(pg_dsn) == 3
        clock.now += 43_200  # 12 h later
        queue(pg_dsn, topic, 2, start=3)
        pub.turn()
        assert published_count(pg_dsn) == 5
        queue(pg_dsn, topic, 1, start=5, projection="other")  # pending, another projection's
        clock.now += 43_200 + 61  # the first three are a day and a minute old
        assert pub.sweep() == 3
        assert sorted(r[1] for r in outbox_rows(pg_dsn)) == sorted(
            f"school:tx{n}:abc" for n in (3, 4, 5)
        )
        queue(pg_dsn, topic, 1, start=6)
        gauges = PgOutbox(PostgresStore(pg_dsn), "school")
        metrics = Metrics()
        metrics.outbox_figures.add("school", gauges.figures, gauges.close)
        got = {f.name: f.samples[0].value for f in metrics.outbox_figures.collect()}
        gauges.close()
        assert got["projector_outbox_pending"] == 1
        assert got["projector_outbox_oldest_pending_seconds"] >= 0
    finally:
        pub.close()


# -- a crash between produce and mark ----------------------------------------------------------


def test_a_crash_between_produce_and_mark_publishes_again_with_the_same_ids(
    services: Services, pg_dsn: str, topics: dict[str, str], tmp_path: Path
) -> None:
    """Proves at-least-once publishing across a crash: a daemon process is killed (SIGKILL,
    crash point ``outbox-after-flush``) right after its publisher's first round reached Kafka
    and before the round was marked published. Restarted, it publishes the queued business
    events, those of the cut round again, and exits 0 on SIGTERM. On the topic every business event the rule names is
    present, with the same id header as its value's id; some are there twice; the consumer's
    set of ids, de-duplicated, equals the set the correlation closed."""
    now = int(time.time() * 1000)
    log = [retimed(tx, now + i) for i, tx in enumerate(school_log(random.Random(8), changes=120))]
    proj = with_outbox(topics, max_batch=5)
    data = config_dict(services, pg_dsn, [proj])
    path = write_config(tmp_path / "config.yaml", data)
    migrate_all(parse_config(data, env={}))
    send(services, [change_message(topics, c) for tx in log for c in tx.changes])
    send(services, [end_message(topics, tx) for tx in log])
    crashing = daemon_process(
        path, env={"PROJECTOR_CRASH_AT": "outbox-after-flush", "PROJECTOR_CRASH_AFTER": "1"}
    )
    assert crashing.wait(120) == -9
    cut = read_topic(services, topics["outbox"])
    assert cut, "the cut round reached Kafka"
    assert published_count(pg_dsn) == 0

    closed = {i for i, _ in expected_business(log)}
    restarted = daemon_process(path)
    try:
        wait_until(lambda: published_count(pg_dsn) == len(closed), "every row to be published")
    finally:
        restarted.terminate()
        assert restarted.wait(60) == 0  # SIGTERM: the publisher stops with the workers
    published = read_topic(services, topics["outbox"])
    assert {h["projector-event-id"] for _, _, h in published} == closed
    assert all(h["projector-event-id"] == v["id"] for _, v, h in published)
    assert len(published) > len(closed)  # the cut round, twice
    assert {v["id"] for _, v, _ in cut} <= closed
    assert {status for _, _, status, _, _ in outbox_rows(pg_dsn)} == {"published"}
