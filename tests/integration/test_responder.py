"""The reference replay responder against the real services: it serves replay requests from an
event-store table onto a target topic, from a Kafka request topic (at least once: committed only
after publishing) or over HTTP, survives malformed requests and ranges the store lacks, and
answers the daemon's own requests so that a withheld event fills its gap."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

from projector import scenarios
from projector.cli import app
from projector.core.replay_request import ReplayRequest
from projector.replay.responder import (
    ReplayResponder,
    Served,
    append_events,
    create_event_store,
    missing_ranges,
    serve_http,
)
from projector.store.errors import StoreUnavailable
from tests.conftest import Services, unique
from tests.integration.harness import (
    make_config,
    migrate_all,
    projection,
    publish,
    rows,
    run_until_caught_up,
)
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration

SCHEMA, TABLE = "write_side", "events"
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nothing"


def wire(stream: str, seq: int) -> dict[str, Any]:
    kind = "OPENED" if seq == 1 else "DEPOSITED"
    data = {"owner": "o"} if seq == 1 else {"amount": seq * 100, "note": {"b": 2, "a": [1, "x"]}}
    return {"stream": stream, "seq": seq, "ts": 1000 + seq, "type": kind, "data": data}


def store_events(pg_dsn: str, wires: list[dict[str, Any]]) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        create_event_store(conn, SCHEMA, TABLE)
        append_events(conn, wires, SCHEMA, TABLE)


def stored_text(pg_dsn: str, stream: str, lo: int, hi: int) -> list[bytes]:
    """The payloads exactly as the event store renders them."""
    found = rows(
        pg_dsn,
        f"select payload::text from {SCHEMA}.{TABLE} where stream = %s and seq between %s and %s"
        " order by seq",
        (stream, lo, hi),
    )
    return [r[0].encode() for r in found]


def request(stream: str, lo: int, hi: int, projection: str = "accounts") -> dict[str, Any]:
    """A replay request as the daemon sends it, as a dict (``publish`` sends it as JSON)."""
    sent: dict[str, Any] = json.loads(
        ReplayRequest(projection, stream, lo, hi, 1, "2025-01-01T00:00:00Z").to_json()
    )
    return sent


def read_topic(
    bootstrap: str, topic: str, expected: int, settle: float = 1.0
) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every message of a one-partition topic: read until ``expected`` are
    in, then ``settle`` seconds more so that extra ones would show."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("read"), "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[tuple[bytes | None, bytes | None]] = []
    deadline = time.monotonic() + 30
    settled_at: float | None = None
    while time.monotonic() < deadline:
        if len(out) >= expected:
            settled_at = settled_at or time.monotonic() + settle
            if time.monotonic() >= settled_at:
                break
        for msg in consumer.consume(100, 0.2):
            if msg.error() is None:
                out.append((msg.key(), msg.value()))
    consumer.close()
    return out


def committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    consumer.close()
    return tp.offset


def committed_all(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    consumer.close()
    return [tp.offset for tp in found]


def read_topic_all(bootstrap: str, topic: str, expected: int) -> list[bytes | None]:
    """The values on every partition of ``topic``, read until ``expected`` are in."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("read"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    out: list[bytes | None] = []
    deadline = time.monotonic() + 30
    while len(out) < expected and time.monotonic() < deadline:
        out += [m.value() for m in consumer.consume(100, 0.2) if m.error() is None]
    consumer.close()
    return out


def serve_until(responder: ReplayResponder, count: int, timeout: float = 30) -> list[Served]:
    """serve_one_batch until ``count`` requests were served (the first assignment takes a
    few seconds)."""
    served: list[Served] = []
    deadline = time.monotonic() + timeout
    while len(served) < count and time.monotonic() < deadline:
        served += responder.serve_one_batch(timeout=0.5)
    return served


@pytest.fixture
def topics(new_topic: Callable[..., str]) -> tuple[str, str]:
    """(requests topic, target topic), one partition each."""
    return new_topic(), new_topic()


def kafka_responder(
    services: Services,
    dsn: str,
    topics: tuple[str, str],
    group: str,
    kind: type[ReplayResponder] = ReplayResponder,
) -> ReplayResponder:
    return kind(
        services.kafka,
        dsn,
        topics[1],
        requests_topic=topics[0],
        group=group,
        schema=SCHEMA,
        table=TABLE,
    )


def test_missing_ranges() -> None:
    """Proves the missing parts of a range are computed exactly: none, inner holes, both ends,
    and everything."""
    assert missing_ranges(1, 5, [1, 2, 3, 4, 5]) == []
    assert missing_ranges(1, 9, [1, 4, 5, 9]) == [(2, 3), (6, 8)]
    assert missing_ranges(3, 8, [5]) == [(3, 4), (6, 8)]
    assert missing_ranges(3, 8, []) == [(3, 8)]


def test_kafka_responder_publishes_the_range_and_commits_it_once(
    services: Services, pg_dsn: str, topics: tuple[str, str]
) -> None:
    """Proves a request read from the request topic is served from the event-store table (in
    a configured schema and table) onto the target topic: exactly the requested events, in seq
    order, keyed by stream, each payload byte for byte as the store holds it; the request's
    offset is committed, so a responder restarted in the same group re-reads nothing and
    publishes nothing more."""
    log = [wire("account:a", s) for s in range(1, 6)] + [wire("account:b", s) for s in (1, 2)]
    store_events(pg_dsn, log)
    publish(services.kafka, topics[0], [request("account:a", 2, 4)])
    group = unique("responder")

    responder = kafka_responder(services, pg_dsn, topics, group)
    try:
        (served,) = serve_until(responder, 1)
    finally:
        responder.close()
    assert (served.published, served.missing) == (3, [])
    assert served.request.stream == "account:a"

    got = read_topic(services.kafka, topics[1], 3)
    assert [k for k, _ in got] == [b"account:a"] * 3
    assert [v for _, v in got] == stored_text(pg_dsn, "account:a", 2, 4)
    assert [json.loads(v or b"") for _, v in got] == log[1:4]
    assert committed(services.kafka, group, topics[0]) == 1

    again = kafka_responder(services, pg_dsn, topics, group)
    try:
        assert serve_until(again, 1, timeout=8) == []
    finally:
        again.close()
    assert len(read_topic(services.kafka, topics[1], 3)) == 3


def test_nothing_is_committed_before_the_events_are_published(
    services: Services, pg_dsn: str, topics: tuple[str, str]
) -> None:
    """Proves at-least-once: while the event store is unreachable the responder raises
    StoreUnavailable, publishes nothing and commits nothing; a responder in the same group that
    can reach the store then serves the very same request."""
    store_events(pg_dsn, [wire("account:a", s) for s in range(1, 4)])
    publish(services.kafka, topics[0], [request("account:a", 1, 3)])
    group = unique("responder")

    broken = kafka_responder(services, UNREACHABLE, topics, group)
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(StoreUnavailable):
            while time.monotonic() < deadline:
                broken.serve_one_batch(timeout=0.5)
        # Rewound: the request is read (and fails) again, still uncommitted.
        with pytest.raises(StoreUnavailable):
            broken.serve_one_batch(timeout=5)
    finally:
        broken.close()
    assert committed(services.kafka, group, topics[0]) < 0
    assert read_topic(services.kafka, topics[1], 0, settle=0.5) == []

    good = kafka_responder(services, pg_dsn, topics, group)
    try:
        (served,) = serve_until(good, 1)
    finally:
        good.close()
    assert served.published == 3
    assert len(read_topic(services.kafka, topics[1], 3)) == 3
    assert committed(services.kafka, group, topics[0]) == 1


class Counting:
    """The responder's real producer or consumer, counting the calls of one method."""

    def __init__(self, real: Any, method: str) -> None:
        self.real, self.method, self.calls = real, method, 0

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.real)

    def __getattr__(self, name: str) -> Any:
        if name == self.method:
            self.calls += 1
        return getattr(self.real, name)


def test_waiting_requests_are_published_with_one_flush_and_committed_with_one_commit(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the requests waiting on the request topic (two partitions) are served together:
    a flush and a synchronous commit per request cost the broker more CPU than serving it
    (`python -m bench.responder`: 27-32x the time and the broker's CPU one by one). All 40
    are published and committed on both partitions, with a handful of flushes and commits,
    not 40."""
    streams = [f"account:{i}" for i in range(40)]
    store_events(pg_dsn, [wire(s, q) for s in streams for q in (1, 2)])
    requests_topic, target = new_topic(partitions=2), new_topic()
    publish(services.kafka, requests_topic, [request(s, 1, 2) for s in streams])
    group = unique("responder")

    responder = kafka_responder(services, pg_dsn, (requests_topic, target), group)
    flushes = Counting(responder._producer, "flush")
    commits = Counting(responder._consumer, "commit")
    responder._producer, responder._consumer = flushes, commits  # type: ignore[assignment]
    try:
        served = serve_until(responder, 40)
    finally:
        responder.close()
    assert sorted(s.request.stream for s in served) == sorted(streams)
    assert len(read_topic_all(services.kafka, target, 80)) == 80
    assert 1 <= flushes.calls <= 4 and 1 <= commits.calls <= 4, (flushes.calls, commits.calls)
    per_partition = committed_all(services.kafka, group, requests_topic, 2)
    assert sum(per_partition) == 40 and min(per_partition) > 0, per_partition


def test_a_batch_failing_midway_commits_nothing_and_is_served_again_whole(
    services: Services, pg_dsn: str, topics: tuple[str, str]
) -> None:
    """Proves at-least-once for a batch of requests: the event store's connection is
    terminated while the third of three requests is read. The first two were handed to Kafka,
    but nothing of the batch is committed; the batch is rewound, and the next call serves all
    three again (the first two twice on the target topic, which replay allows), then commits
    all three."""
    store_events(pg_dsn, [wire(f"account:{i}", 1) for i in range(3)])
    publish(services.kafka, topics[0], [request(f"account:{i}", 1, 1) for i in range(3)])
    group = unique("responder")

    reads: list[ReplayRequest] = []

    class LosesItsStoreOnTheThirdRead(ReplayResponder):
        def _read(self, req: ReplayRequest) -> list[tuple[int, str]]:
            reads.append(req)
            if len(reads) == 3 and self._conn is not None:
                with psycopg.connect(pg_dsn, autocommit=True) as admin:
                    admin.execute("select pg_terminate_backend(%s)", (self._conn.info.backend_pid,))
            return super()._read(req)

    responder = kafka_responder(services, pg_dsn, topics, group, LosesItsStoreOnTheThirdRead)
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(StoreUnavailable):
            while time.monotonic() < deadline:
                responder.serve_one_batch(timeout=0.5)
        assert len(reads) == 3
        assert committed(services.kafka, group, topics[0]) < 0
        again = serve_until(responder, 3)
    finally:
        responder.close()
    assert [s.request.stream for s in again] == [f"account:{i}" for i in range(3)]
    assert committed(services.kafka, group, topics[0]) == 3
    got = [k or b"" for k, _ in read_topic(services.kafka, topics[1], 5)]
    assert sorted(got) == sorted([b"account:0", b"account:1"] * 2 + [b"account:2"])


def test_malformed_requests_are_logged_and_skipped(
    services: Services, pg_dsn: str, topics: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves malformed requests (not JSON, a missing field, an inverted range, a JSON list, a
    tombstone) are logged and skipped without stopping the responder: `run` serves the valid
    request behind them, commits past all six, and returns once idle."""
    store_events(pg_dsn, [wire("account:a", s) for s in range(1, 4)])
    bad: list[dict[str, Any] | bytes | None] = [
        b"\x00not json",
        b'{"stream": "account:a"}',
        json.dumps(request("account:a", 3, 1)).encode(),
        b"[1, 2]",
        None,
    ]
    publish(services.kafka, topics[0], [*bad, request("account:a", 1, 3)])
    group = unique("responder")

    responder = kafka_responder(services, pg_dsn, topics, group)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="projector.replay.responder"):
        try:
            responder.run(threading.Event(), idle_exit=4)
        finally:
            responder.close()
    assert time.monotonic() - started < 30
    skipped = [r for r in caplog.records if "malformed replay request" in r.getMessage()]
    assert len(skipped) == 5
    got = read_topic(services.kafka, topics[1], 3)
    assert [json.loads(v or b"") for _, v in got] == [wire("account:a", s) for s in (1, 2, 3)]
    assert committed(services.kafka, group, topics[0]) == 6


def test_a_range_the_store_lacks_is_published_as_far_as_it_exists(
    services: Services, pg_dsn: str, topics: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves a request that runs past the stored events publishes those that exist and logs
    the missing range; one for a stream the store never had publishes nothing, logs it, and is
    committed like any other."""
    store_events(pg_dsn, [wire("account:a", s) for s in range(1, 6)])
    publish(services.kafka, topics[0], [request("account:a", 4, 8), request("account:zzz", 1, 3)])
    group = unique("responder")

    responder = kafka_responder(services, pg_dsn, topics, group)
    with caplog.at_level(logging.WARNING, logger="projector.replay.responder"):
        try:
            served = serve_until(responder, 2)
        finally:
            responder.close()
    assert [(s.request.stream, s.published, s.missing) for s in served] == [
        ("account:a", 2, [(6, 8)]),
        ("account:zzz", 0, [(1, 3)]),
    ]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("(6, 8)" in m and "account:a" in m for m in warnings)
    assert any("(1, 3)" in m and "account:zzz" in m for m in warnings)
    got = read_topic(services.kafka, topics[1], 2)
    assert [json.loads(v or b"") for _, v in got] == [wire("account:a", 4), wire("account:a", 5)]
    assert committed(services.kafka, group, topics[0]) == 2


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def http_serving(responder: ReplayResponder) -> tuple[str, threading.Event, threading.Thread]:
    stop = threading.Event()
    ready: list[tuple[str, int]] = []
    thread = threading.Thread(
        target=serve_http, args=(responder, ("127.0.0.1", 0), stop, None, ready.append)
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not ready and time.monotonic() < deadline:
        time.sleep(0.05)
    host, port = ready[0]
    return f"http://{host}:{port}/replay", stop, thread


def test_http_responder_answers_202_after_publishing_and_400_on_bad_json(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the HTTP endpoint: a POSTed request is answered 202 with what was published and
    what is missing, once the events are on the target topic; a body that is not a request is
    answered 400 and publishes nothing; the server keeps serving after it."""
    target = new_topic()
    store_events(pg_dsn, [wire("account:h", s) for s in range(1, 5)])
    responder = ReplayResponder(services.kafka, pg_dsn, target, schema=SCHEMA, table=TABLE)
    url, stop, thread = http_serving(responder)
    try:
        code, body = post(url, json.dumps(request("account:h", 2, 6)).encode())
        assert (code, body) == (202, {"published": 3, "missing": [[5, 6]]})
        assert [json.loads(v or b"") for _, v in read_topic(services.kafka, target, 3)] == [
            wire("account:h", s) for s in (2, 3, 4)
        ]
        code, body = post(url, b"{not json")
        assert code == 400
        assert "malformed replay request" in body["error"]
        code, _ = post(url, json.dumps(request("account:h", 1, 1)).encode())
        assert code == 202
    finally:
        stop.set()
        thread.join(10)
        responder.close()
    assert not thread.is_alive()
    assert len(read_topic(services.kafka, target, 4)) == 4


def test_http_responder_answers_503_when_the_store_is_unreachable(
    services: Services, new_topic: Callable[..., str]
) -> None:
    """Proves an event store that cannot be reached is answered 503 (try again later), not a
    crash, and the server keeps running."""
    responder = ReplayResponder(services.kafka, UNREACHABLE, new_topic())
    url, stop, thread = http_serving(responder)
    try:
        for _ in range(2):
            code, body = post(url, json.dumps(request("account:h", 1, 2)).encode())
            assert code == 503
            assert "event store" in body["error"]
    finally:
        stop.set()
        thread.join(10)
        responder.close()


def test_cli_replay_responder_serves_and_exits_when_idle(
    services: Services, pg_dsn: str, topics: tuple[str, str]
) -> None:
    """Proves `projector replay-responder --exit-when-idle` serves the waiting request from the
    configured schema and table onto the target topic, then exits 0 on its own; without a
    channel (neither --requests-topic nor --http) it refuses with exit 2."""
    store_events(pg_dsn, [wire("account:c", s) for s in range(1, 4)])
    publish(services.kafka, topics[0], [request("account:c", 1, 3)])
    args = ["replay-responder", "--bootstrap", services.kafka, "--target-topic", topics[1]]
    args += ["--schema", SCHEMA, "--table", TABLE, "--group", unique("responder")]
    result = CliRunner().invoke(
        app,
        [*args, "--requests-topic", topics[0], "--exit-when-idle", "--idle-seconds", "3"],
        env={"PROJECTOR_RESPONDER_DSN": pg_dsn},
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(read_topic(services.kafka, topics[1], 3)) == 3

    refused = CliRunner().invoke(app, args, env={"PROJECTOR_RESPONDER_DSN": pg_dsn})
    assert refused.exit_code == 2
    assert "--requests-topic" in refused.stderr


def test_the_daemons_requests_fill_a_withheld_event_through_the_replay_topic(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the pattern end to end: events withheld from the source topic but in the event
    store open gaps; the daemon's replay requests (kafka channel) reach the responder, which
    re-publishes the ranges on the projection's replay topic; the gaps fill, the parked events
    drain, no gap is left and every view row equals the oracle."""
    rng = random.Random(11)
    log = scenarios.account_log(rng, accounts=20, events_per_account=8)
    withheld = {id(w) for w in log[5::37] if 1 < w["seq"] < 8}  # a later event parks
    source, replay, requests = new_topic(partitions=2), new_topic(), new_topic()
    publish(services.kafka, source, [w for w in log if id(w) not in withheld])
    store_events(pg_dsn, log)
    proj = projection(
        "accounts",
        [source],
        ["handlers.accounts"],
        gap_timeout="300ms",
        replay_topic=replay,
        replay={"channel": "kafka", "topic": requests, "max_interval": "2s"},
    )
    config = make_config(services, pg_dsn, [proj])
    migrate_all(config)

    responder = ReplayResponder(
        services.kafka,
        pg_dsn,
        replay,
        requests_topic=requests,
        group=unique("responder"),
        schema=SCHEMA,
        table=TABLE,
    )
    stop = threading.Event()
    thread = threading.Thread(target=responder.run, args=(stop,))
    thread.start()
    try:
        assert run_until_caught_up(config) == 0
    finally:
        stop.set()
        thread.join(30)
        responder.close()
    assert len(withheld) >= 3
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
