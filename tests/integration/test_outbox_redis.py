"""The outbox on the Redis store (issue 12; docs/correlation.md, "Redis outbox as built") against
real Kafka and Redis: the business events a correlation closes are queued by the batch's
script, once per id, and published at least once with their stable id in a header, by the one
publisher holding the lease; a rebuild's batches hold theirs at the version they build, and
the swap hands over those the live run still owes; published ids are swept after the
retention. The outbox is read back by restating the documented layout (docs/redis.md), not
through the store.

The scenarios mirror :mod:`tests.integration.test_outbox` (PostgreSQL), whose helpers they use.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from projector.cdc_scenario import school_log
from projector.config import OutboxConfig, parse_config
from projector.core.correlate import ClosedWindow, Pending
from projector.core.event import Event
from projector.metrics import Metrics
from projector.runner.outbox import OutboxPublisher, open_outbox, producer_config
from projector.store.base import OutboxMessage
from projector.store.redis import RedisStateCorrupt, RedisStore
from projector.store.redis_outbox import RedisOutbox
from projector.store.redis_rebuild import RedisRebuildStore
from tests.conftest import Services
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import daemon_process, migrate_all, write_config
from tests.integration.test_correlation import (
    Clock,
    change_message,
    end_message,
    enrolments,
    expected_business,
    retimed,
    run_burst,
    send,
    tx_ms,
)
from tests.integration.test_correlation_redis import RedisBackend
from tests.integration.test_outbox import (
    DirectBatches,
    _count,
    raw_messages,
    read_topic,
    topics,
)

pytestmark = pytest.mark.integration

__all__ = ["topics"]  # the fixture: the school's topics and the outbox topic

PROJECTION = "school"
HANDLERS = ["tests.integration.business_log"]  # tests.integration.business_log_redis on Redis
# A redis.Redis with decode_responses=True: its replies are str, which its stubs do not say.
Client = Any


@pytest.fixture
def backend(services: Services, pg_dsn: str, redis_prefix: str) -> RedisBackend:
    return RedisBackend(services, pg_dsn, redis_prefix)


@pytest.fixture
def client(services: Services) -> Iterator[Client]:
    with redis.Redis.from_url(services.redis_url, decode_responses=True) as r:
        yield r


def with_outbox(
    backend: RedisBackend,
    topics: dict[str, str],
    correlation: dict[str, Any] | None = None,
    **outbox: Any,
) -> dict[str, Any]:
    """The school projection on Redis, its business events also published."""
    proj = backend.projection(
        topics, HANDLERS, window="60s", idle_after="1h", **(correlation or {})
    )
    proj["correlation"]["outbox"] = {"topic": topics["outbox"], **outbox}
    return proj


# -- the documented layout, read back ----------------------------------------------------------


def live(prefix: str) -> str:
    return f"{prefix}:s:{PROJECTION}:outbox"


def queued(r: Client, prefix: str) -> list[tuple[int, dict[str, str]]]:
    """The queue's entries: (n of ``<n>-0``, fields), in order."""
    return [(int(i.split("-")[0]), f) for i, f in r.xrange(live(prefix))]


def ids(r: Client, prefix: str) -> dict[str, float]:
    """``outbox:ids``: event id -> +inf (pending) or the time it was published."""
    return dict(r.zrange(f"{live(prefix)}:ids", 0, -1, withscores=True))


def published_count(r: Client, prefix: str) -> int:
    return sum(1 for score in ids(r, prefix).values() if score != float("inf"))


def logged(r: Client, prefix: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """What ``business_log_redis`` was handed: id -> (times applied, {type, stream, data,
    meta})."""
    ns = f"{prefix}:v:{PROJECTION}:{r.get(f'{prefix}:v:{PROJECTION}:active') or '1'}"
    applied = r.hgetall(f"{ns}:business_log:applied")
    events = r.hgetall(f"{ns}:business_log:event")
    return {i: (int(n), json.loads(events[i])) for i, n in applied.items()}


# -- end to end --------------------------------------------------------------------------------


def test_business_events_are_published_once_each_with_their_id_header(
    backend: RedisBackend, topics: dict[str, str], client: Client
) -> None:
    """Proves publishing end to end on Redis: the school scenario's log run through the daemon
    (burst run); every business event the rule names is on the outbox topic exactly once (no
    crash here), its value the very event the handler was handed (type, stream, data, meta),
    keyed by its stream, with the headers ``projector-event-id`` (its id),
    ``projector-event-type`` and ``projector-projection``. The queue is left empty, every id
    is recorded as published, and the counters say so."""
    log = school_log(random.Random(4), changes=150)
    config = backend.make(with_outbox(backend, topics))
    send(backend.services, [change_message(topics, c) for tx in log for c in tx.changes])
    send(backend.services, [end_message(topics, tx) for tx in log])
    metrics = run_burst(config, Clock(tx_ms(log[0]) / 1000))

    expected = sorted(expected_business(log))
    handed = logged(client, backend.prefix)
    assert sorted((i, e["type"]) for i, (_, e) in handed.items()) == expected
    published = read_topic(backend.services, topics["outbox"])
    assert sorted((v["id"], v["type"]) for _, v, _ in published) == expected
    for key, value, headers in published:
        times, event = handed[value["id"]]
        assert times == 1
        assert [value[f] for f in ("type", "stream", "data", "meta")] == [
            event[f] for f in ("type", "stream", "data", "meta")
        ]
        assert key == event["stream"].encode()
        assert headers == {
            "projector-event-id": value["id"],
            "projector-event-type": event["type"],
            "projector-projection": "school",
        }
    assert queued(client, backend.prefix) == []
    assert published_count(client, backend.prefix) == len(expected)
    assert _count(metrics.outbox_published) == len(expected)
    assert _count(metrics.outbox_errors) == 0


# -- batches applied in-process, without Kafka -------------------------------------------------


@pytest.fixture
def direct(backend: RedisBackend, topics: dict[str, str]) -> Iterator[Callable[..., DirectBatches]]:
    made: list[DirectBatches] = []

    def make_direct(
        name: str = PROJECTION, correlation: dict[str, Any] | None = None, **outbox: Any
    ) -> DirectBatches:
        config = backend.make(with_outbox(backend, topics, correlation, **outbox))
        batches = DirectBatches(config, name, Clock(time.time()))
        made.append(batches)
        return batches

    yield make_direct
    for batches in made:
        batches.close()


def test_a_business_event_closed_twice_or_redelivered_is_queued_once(
    backend: RedisBackend,
    topics: dict[str, str],
    direct: Callable[..., DirectBatches],
    client: Client,
) -> None:
    """Proves the de-duplication in the batch script (``ZADD NX`` on ``outbox:ids``, the queue
    entry only if added): four enrolment transactions applied as one batch queue four entries
    in order (key: the business event's id, as configured); the same batch redelivered queues
    nothing (its parts are duplicates); and with the correlation records forgotten, the batch
    closes every window again (the handler is handed each business event a second time, with
    the same ids) while the queue keeps one entry per id."""
    txs = enrolments(school_log(random.Random(5), changes=300), 4)
    batches = direct(key="id")
    messages = raw_messages(topics, txs)
    batches.apply(messages)
    first = queued(client, backend.prefix)
    expected = sorted(i for i, _ in expected_business(txs))
    assert sorted(f["id"] for _, f in first) == expected
    assert [n for n, _ in first] == [1, 2, 3, 4]
    assert all(f["key"] == f["id"] and f["topic"] == topics["outbox"] for _, f in first)
    assert set(ids(client, backend.prefix).values()) == {float("inf")}

    batches.apply(messages)
    assert queued(client, backend.prefix) == first

    base = f"{backend.prefix}:s:{PROJECTION}:1"
    client.delete(*client.scan_iter(match=f"{base}:co:*"), f"{base}:codue", f"{base}:coopen")
    batches.apply(messages)
    assert sorted(n for n, _ in logged(client, backend.prefix).values()) == [2, 2, 2, 2]
    assert queued(client, backend.prefix) == first


def test_a_rebuilds_batches_hold_their_business_events(
    backend: RedisBackend,
    topics: dict[str, str],
    direct: Callable[..., DirectBatches],
    client: Client,
) -> None:
    """Proves a rebuild does not publish: batches applied under the rebuild's name
    (``school#rebuild``, at the version it builds) write held entries (``cohold`` /
    ``coholdts`` at that version), and nothing to the live queue, each with the event's JSON
    and its correlation key in ``meta.key`` (for the swap's hand-off); held entries further
    than ``window + closed_retention`` behind the watermark are pruned when a later
    transaction moves every input partition past them; and starting the rebuild again deletes
    the held set with the version it was built in."""
    early, late = enrolments(school_log(random.Random(6), changes=300), 2)
    late = retimed(late, tx_ms(early) + 3_600_000)
    batches = direct(name="school#rebuild", correlation={"closed_retention": "1s"})
    assert isinstance(batches.store, RedisStore)
    rebuild = RedisRebuildStore(batches.store, PROJECTION, PROJECTION)
    rebuild.start([])
    target = client.get(f"{backend.prefix}:s:school#rebuild:target")
    held = f"{backend.prefix}:s:{PROJECTION}:{target}:cohold"

    batches.apply(raw_messages(topics, [early]))
    [(event_id, raw)] = client.hgetall(held).items()
    assert event_id == expected_business([early])[0][0]
    n, _, body = raw.partition(" ")
    message = json.loads(body)
    assert (n, message["topic"], message["key"]) == (
        "1",
        topics["outbox"],
        message["event"]["stream"],
    )
    assert message["event"]["meta"]["key"] == str(early.tx_id)
    assert client.zrange(f"{held}ts", 0, -1) == [event_id]
    assert client.exists(live(backend.prefix), f"{live(backend.prefix)}:ids") == 0

    batches.apply(raw_messages(topics, [late], start=10))
    assert list(client.hgetall(held)) == [expected_business([late])[0][0]]
    assert client.zcard(f"{held}ts") == 1

    rebuild.start([])
    assert client.exists(held, f"{held}ts", f"{held}seq") == 0


def record(key: str, open_part: bool, closed: bool) -> Pending:
    """A live correlation record: with an open part and/or a closed window."""
    parts = {"student": (Event(f"s:{key}", None, 1, "c", {}, f"{key}/1", None, {}),)}
    windows = (ClosedWindow(5, frozenset({f"{key}/0"}), None),) if closed else ()
    return Pending(
        key, parts if open_part else {}, closed=windows, closed_until=5 if closed else None
    )


def business(n: int, key: str) -> Event:
    return Event(
        f"student:{n}", None, 1_000 + n, "update", {"n": n}, f"school:{key}:{n}", None, {"key": key}
    )


def test_the_swap_hands_over_the_held_events_the_live_run_still_owes(
    backend: RedisBackend, client: Client
) -> None:
    """Proves the swap's hand-off on state set up by hand (PostgreSQL's rule): of the held
    events, those whose key the live run closed with nothing open are dropped (it published
    them); those whose key is still open live, closed but with a part open again, or unknown
    to the live run (the rebuild read further) are queued as pending live entries, in the
    order they were named; one already in ``outbox:ids`` (queued or published) is not queued again; the
    held set is gone after the swap and the rebuilt version is live."""
    store = RedisStore(backend.services.redis_url, backend.prefix)
    try:
        with store.batch(PROJECTION, PROJECTION) as tx:  # the live state, version 1
            tx.write_correlations(
                [
                    (record("done", open_part=False, closed=True), None),
                    (record("open", open_part=True, closed=False), 10),
                    (record("again", open_part=True, closed=True), 10),
                    (record("seen", open_part=True, closed=False), 10),
                ],
                [],
            )
            tx.write_outbox([OutboxMessage(business(9, "seen"), "out", "student:9")])
        rebuild = RedisRebuildStore(store, PROJECTION, PROJECTION)
        rebuild.start([])
        names = ["open", "done", "unknown", "again", "seen"]
        events = [business(n, key) for n, key in enumerate(names)]
        events[4] = business(9, "seen")
        with store.batch("school#rebuild", PROJECTION) as tx:
            tx.write_outbox([OutboxMessage(e, "out", e.stream) for e in events[:3]])
        with store.batch("school#rebuild", PROJECTION) as tx:
            tx.write_outbox([OutboxMessage(e, "out", e.stream) for e in events[3:]])
        rebuild.swap(lambda targets: None, 5.0, [])
        entries = queued(client, backend.prefix)
        assert [f["id"] for _, f in entries] == [
            "school:seen:9",
            "school:open:0",
            "school:unknown:2",
            "school:again:3",
        ]
        assert [n for n, _ in entries] == [1, 2, 3, 4]
        assert client.get(f"{backend.prefix}:s:{PROJECTION}:version") == "2"
        assert client.keys(f"{backend.prefix}:s:{PROJECTION}:2:cohold*") == []
    finally:
        store.close()


def test_the_batch_checks_the_outbox_keys_types_before_writing_anything(
    backend: RedisBackend, client: Client
) -> None:
    """Proves the script checks the outbox keys with the rest before it writes: an outbox
    queue key holding a string (written by something other than projector), or a counter
    behind the queue's last entry (lost), stops the batch as damaged state with nothing of it
    written: not its checkpoint, not its other queued events."""
    store = RedisStore(backend.services.redis_url, backend.prefix)
    tp = ("t", 0)
    try:
        epoch = store.claim(PROJECTION, [tp], "me")[tp].epoch
        client.set(live(backend.prefix), "not a stream")
        with pytest.raises(RedisStateCorrupt), store.batch(PROJECTION, PROJECTION) as tx:
            tx.fence({tp: 5}, {tp: epoch})
            tx.write_outbox([OutboxMessage(business(1, "k"), "out", "student:1")])
        assert client.hget(f"{backend.prefix}:s:{PROJECTION}:offsets", "t:0") is None
        assert client.exists(f"{live(backend.prefix)}:ids") == 0

        client.delete(live(backend.prefix))
        with store.batch(PROJECTION, PROJECTION) as tx:
            tx.write_outbox([OutboxMessage(business(n, "k"), "out", "s") for n in (1, 2)])
        client.delete(f"{live(backend.prefix)}:seq")
        with pytest.raises(RedisStateCorrupt), store.batch(PROJECTION, PROJECTION) as tx:
            tx.fence({tp: 5}, {tp: epoch})
            tx.write_outbox([OutboxMessage(business(3, "k"), "out", "s")])
        assert client.hget(f"{backend.prefix}:s:{PROJECTION}:offsets", "t:0") is None
        assert [f["id"] for _, f in queued(client, backend.prefix)] == [
            "school:k:1",
            "school:k:2",
        ]
    finally:
        store.close()


# -- the publisher -----------------------------------------------------------------------------


def queue(services: Services, prefix: str, topic: str, count: int, start: int = 0) -> list[str]:
    """Queue ``count`` business events directly (as a batch would); returns their ids."""
    events = [business(n, f"tx{n}") for n in range(start, start + count)]
    store = RedisStore(services.redis_url, prefix)
    try:
        with store.batch(PROJECTION, PROJECTION) as tx:
            tx.write_outbox([OutboxMessage(e, topic, e.stream) for e in events])
    finally:
        store.close()
    return [e.id for e in events]


def publisher(
    services: Services,
    prefix: str,
    topic: str,
    clock: Clock | None = None,
    lease: float = 30.0,
    **outbox: Any,
) -> OutboxPublisher:
    return OutboxPublisher(
        PROJECTION,
        OutboxConfig.model_validate({"topic": topic, **outbox}),
        RedisOutbox(RedisStore(services.redis_url, prefix), PROJECTION, lease=lease),
        producer_config(services.kafka, {}),
        threading.Event(),
        clock or time.time,
        Metrics(),
        lock_retry=0.2,
    )


def test_one_publisher_at_a_time_and_an_expired_lease_is_taken_over(
    services: Services,
    redis_prefix: str,
    new_topic: Callable[..., str],
    client: Client,
) -> None:
    """Proves one publisher per projection by the lease: two publishers run side by side; only
    one takes the lease and publishes everything (each id once, in queue order on a
    one-partition topic) while the other publishes nothing. When the holder stops it releases
    the lease and the other takes over what is queued next. A lease whose holder died without
    releasing it (taken here and never renewed) holds the others off until it expires (1 s),
    then is taken over."""
    topic = new_topic(partitions=1)
    pubs = [publisher(services, redis_prefix, topic, max_batch=7) for _ in range(2)]
    threads = [threading.Thread(target=p.run) for p in pubs]
    first = queue(services, redis_prefix, topic, 30)
    try:
        for t in threads:
            t.start()
        wait_until(lambda: published_count(client, redis_prefix) == 30, "the first 30")
        wait_until(lambda: sum(p.holding for p in pubs) == 1, "one holder")
        holder, idle = (0, 1) if pubs[0].holding else (1, 0)
        assert _count(pubs[idle].metrics.outbox_published) == 0
        pubs[holder].halt.set()
        threads[holder].join(30)
        second = queue(services, redis_prefix, topic, 5, start=30)
        wait_until(lambda: published_count(client, redis_prefix) == 35, "the next 5")
        assert pubs[idle].holding
        assert _count(pubs[idle].metrics.outbox_published) == 5
    finally:
        for p in pubs:
            p.halt.set()
        for t in threads:
            t.join(30)
    assert [h["projector-event-id"] for _, _, h in read_topic(services, topic)] == first + second
    assert client.exists(f"{live(redis_prefix)}:lock") == 0  # released on close

    dead = RedisOutbox(RedisStore(services.redis_url, redis_prefix), PROJECTION, lease=1.0)
    locked_at = time.monotonic()
    assert dead.try_lock()  # and never renewed nor released
    heir = publisher(services, redis_prefix, topic)
    third = queue(services, redis_prefix, topic, 2, start=35)
    thread = threading.Thread(target=heir.run)
    thread.start()
    try:
        wait_until(lambda: published_count(client, redis_prefix) == 37, "the lease taken over")
        assert time.monotonic() - locked_at >= 0.9  # not before the dead one's lease expired
    finally:
        heir.halt.set()
        thread.join(30)
        dead.store.close()
    assert [h["projector-event-id"] for _, _, h in read_topic(services, topic)][35:] == third


def test_published_ids_are_swept_after_the_retention_and_the_gauges_count_pending(
    services: Services,
    redis_prefix: str,
    new_topic: Callable[..., str],
    client: Client,
) -> None:
    """Proves the retention sweep, by the publisher's injected clock: ids published at T are
    kept in ``outbox:ids`` (so a re-closed event is not queued again) until T + retention,
    then deleted at the next sweep, while ids published later and pending ones stay. The
    gauges, read at scrape time through ``open_outbox``'s kind of store, count the pending
    entries and the oldest one's age."""
    topic = new_topic(partitions=1)
    clock = Clock(1_800_000_000.0)
    pub = publisher(services, redis_prefix, topic, clock, retention="1d")
    try:
        queue(services, redis_prefix, topic, 3)
        assert pub.turn() > 0 and published_count(client, redis_prefix) == 3
        clock.now += 43_200  # 12 h later
        queue(services, redis_prefix, topic, 2, start=3)
        pub.turn()
        assert published_count(client, redis_prefix) == 5
        clock.now += 43_200 + 61  # the first three are a day and a minute old
        queue(services, redis_prefix, topic, 1, start=5)  # stays pending: no turn
        assert pub.sweep() == 3
        assert sorted(ids(client, redis_prefix)) == [f"school:tx{n}:{n}" for n in (3, 4, 5)]
        assert ids(client, redis_prefix)["school:tx5:5"] == float("inf")

        gauges = RedisOutbox(RedisStore(services.redis_url, redis_prefix), PROJECTION)
        metrics = Metrics()
        metrics.outbox_figures.add(PROJECTION, gauges.figures, gauges.close)
        got = {f.name: f.samples[0].value for f in metrics.outbox_figures.collect()}
        gauges.close()
        assert got["projector_outbox_pending"] == 1
        assert 0 <= got["projector_outbox_oldest_pending_seconds"] < 60
    finally:
        pub.close()


# -- a crash between produce and mark ----------------------------------------------------------


def test_a_crash_between_produce_and_mark_publishes_again_with_the_same_ids(
    backend: RedisBackend, topics: dict[str, str], client: Client, tmp_path: Path
) -> None:
    """Proves at-least-once publishing across a crash on Redis: a daemon process is killed
    (SIGKILL, crash point ``outbox-after-flush``) right after its publisher's first round
    reached Kafka and before the round was marked. Restarted (the same ``kafka.instance_id``:
    it takes its own lease back at once instead of waiting for it to expire), it publishes the
    queued business events, those of the cut round again, and exits 0 on SIGTERM. Every
    business event the rule names is on the topic with the same id header as its value's id;
    some twice; the de-duplicated set of ids equals the set the correlation closed."""
    now = int(time.time() * 1000)
    log = [retimed(tx, now + i) for i, tx in enumerate(school_log(random.Random(8), changes=120))]
    data = backend.config_dict(with_outbox(backend, topics, max_batch=5))
    data["kafka"]["instance_id"] = "outbox-crash"
    path = write_config(tmp_path / "config.yaml", data)
    migrate_all(parse_config(data, env={}))
    send(backend.services, [change_message(topics, c) for tx in log for c in tx.changes])
    send(backend.services, [end_message(topics, tx) for tx in log])
    crashing = daemon_process(
        path, env={"PROJECTOR_CRASH_AT": "outbox-after-flush", "PROJECTOR_CRASH_AFTER": "1"}
    )
    assert crashing.wait(120) == -9
    cut = read_topic(backend.services, topics["outbox"])
    assert cut, "the cut round reached Kafka"
    assert published_count(client, backend.prefix) == 0

    closed = {i for i, _ in expected_business(log)}
    restarted = daemon_process(path)
    try:
        wait_until(
            lambda: published_count(client, backend.prefix) == len(closed),
            "every business event to be published",
        )
    finally:
        restarted.terminate()
        assert restarted.wait(60) == 0
    published = read_topic(backend.services, topics["outbox"])
    assert {h["projector-event-id"] for _, _, h in published} == closed
    assert all(h["projector-event-id"] == v["id"] for _, v, h in published)
    assert len(published) > len(closed)  # the cut round, twice
    assert {v["id"] for _, v, _ in cut} <= closed
    assert queued(client, backend.prefix) == []


def test_open_outbox_gives_the_redis_outbox_with_the_instance_id_as_lease_token(
    backend: RedisBackend, topics: dict[str, str], client: Client
) -> None:
    """Proves ``open_outbox`` serves a Redis projection (no longer refused) with a
    :class:`RedisOutbox` whose lease token is the configured ``kafka.instance_id``: another
    instance's outbox cannot take the lease one holds; closing a second outbox of the same
    instance that never took it (the gauges' own) leaves the lease alone; and the instance
    restarted (a new outbox, same id) takes it back at once."""
    data = backend.config_dict(with_outbox(backend, topics))
    data["kafka"]["instance_id"] = "pod-0"
    config = parse_config(data, env={})
    boxes = [open_outbox(config, config.projections[0]) for _ in range(3)]
    other = RedisOutbox(RedisStore(backend.services.redis_url, backend.prefix), PROJECTION)
    lock = f"{live(backend.prefix)}:lock"
    try:
        assert all(isinstance(b, RedisOutbox) and b.token == "pod-0" for b in boxes)
        assert boxes[0].try_lock()
        assert not other.try_lock()
        boxes[1].close()
        assert client.get(lock) == "pod-0"
        assert boxes[2].try_lock()
    finally:
        for b in [boxes[0], boxes[2], other]:
            b.close()
    assert client.exists(lock) == 0
