"""The limits projector is compared with, on the same topics and the same view rows:

(a) consume-only: confluent-kafka reads the whole topic and decodes every message with orjson;
    no store;
(b) store-only: the view rows written per batch with no Kafka, each batch folded in Python to
    one change per account; PostgreSQL: COPY into a temporary table then one INSERT ... ON
    CONFLICT, or executemany in pipeline mode; Redis: one Lua script, or a pipelined
    MULTI/EXEC; the faster of the two counts;
(c) naive: what a hand-written consumer does, one transaction per event (an autocommitted
    upsert; in Redis a MULTI/EXEC), on the first events of the in-order topic.

Every figure is events per second, timed from the first event to the last.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import orjson
import psycopg
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.services import Resources, Services, unique
from bench.workload import DEPOSITED, OPENED, WITHDRAWN, Row, Workload
from handlers.accounts import MIGRATIONS

# One change per account per batch: owner (when opened), balance, deposits, withdrawals,
# events, last seq.
Change = tuple[str, str | None, int, int, int, int, int]


@dataclass(frozen=True)
class Baseline:
    name: str
    events: int
    seconds: float
    detail: str = ""
    view: str = "-"  # for a run that builds the whole view (the peer): checked against the answer

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def faster(a: Baseline, b: Baseline) -> Baseline:
    return a if a.rate >= b.rate else b


# ------------------------------------------------------------------------------ (a) consume


def _consumer(svc: Services, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": svc.kafka,
            "group.id": unique("bench-baseline"),
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            # librdkafka's default (1000 ms) stalls a consumer that drains its queue fast.
            "fetch.queue.backoff.ms": 1,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


def _messages(svc: Services, topic: str, count: int) -> Iterator[list[bytes]]:
    """The first ``count`` message values of ``topic``, in batches of up to 2,000."""
    consumer = _consumer(svc, topic)
    seen, deadline = 0, time.monotonic() + 600
    try:
        while seen < count and time.monotonic() < deadline:
            values = [m.value() or b"" for m in consumer.consume(2000, 0.05) if not m.error()]
            values = values[: count - seen]
            seen += len(values)
            if values:
                yield values
    finally:
        consumer.close()


def consume_only(svc: Services, topic: str, count: int) -> Baseline:
    started, decoded = 0.0, 0
    for values in _messages(svc, topic, count):
        started = started or time.perf_counter()
        for value in values:
            orjson.loads(value)
        decoded += len(values)
    return Baseline("(a) consume-only", decoded, time.perf_counter() - started, "orjson")


# ------------------------------------------------------------------------------ (b) store-only


def fold(w: Workload, start: int, stop: int) -> list[Change]:
    """Events ``start..stop`` of the ordered log as one change per account."""
    acc: dict[int, list[int]] = {}
    for i in range(start, stop):
        n, kind, amount = w.stream[i], w.kind[i], w.amount[i]
        a = acc.get(n)
        if a is None:
            a = acc[n] = [0, 0, 0, 0, 0, 0]  # opened, balance, deposits, withdrawals, events, seq
        if kind == OPENED:
            a[0] = 1
        elif kind == DEPOSITED:
            a[1] += amount
            a[2] += amount
        elif kind == WITHDRAWN:
            a[1] -= amount
            a[3] += amount
        a[4] += 1
        a[5] = w.seq[i]
    return [
        (str(n), w.owner(n) if a[0] else None, a[1], a[2], a[3], a[4], a[5])
        for n, a in sorted(acc.items())
    ]


_COLUMNS = "id, owner, balance, deposits, withdrawals, applied_events, last_seq"
_ON_CONFLICT = """
    on conflict (id) do update set
        owner = coalesce(excluded.owner, a.owner),
        balance = a.balance + excluded.balance,
        deposits = a.deposits + excluded.deposits,
        withdrawals = a.withdrawals + excluded.withdrawals,
        applied_events = a.applied_events + excluded.applied_events,
        last_seq = excluded.last_seq
"""
_UPSERT = f"""
    insert into accounts as a ({_COLUMNS}, rejected)
    values (%s, %s, %s, %s, %s, %s, %s, 0) {_ON_CONFLICT}
"""
_FROM_STAGE = f"""
    insert into accounts as a ({_COLUMNS}, rejected)
    select {_COLUMNS}, 0 from stage {_ON_CONFLICT}
"""
STAGE = """
    create temporary table stage (
        id text, owner text, balance bigint, deposits bigint, withdrawals bigint,
        applied_events bigint, last_seq bigint
    ) on commit delete rows
"""


def fresh_table(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("drop table if exists accounts")
    conn.execute(MIGRATIONS[0])


def pg_store_only(res: Resources, w: Workload, count: int, batch: int) -> list[Baseline]:
    """COPY + INSERT ... ON CONFLICT, then executemany in pipeline mode, each on a fresh
    table, for the first ``count`` events; each checked against the workload's answer."""
    dsn = res.database()
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(STAGE)
        for name, write in (("COPY + upsert", copy_batch), ("executemany pipeline", _pipeline)):
            fresh_table(conn)
            started = time.perf_counter()
            for start in range(0, count, batch):
                with conn.transaction():
                    write(conn, fold(w, start, min(count, start + batch)))
            seconds = time.perf_counter() - started
            out.append(Baseline("(b) store-only", count, seconds, name))
            check_pg_view(conn, w, count)
    return out


def copy_batch(conn: psycopg.Connection[tuple[object, ...]], changes: list[Change]) -> None:
    with conn.cursor() as cur:
        with cur.copy(f"copy stage ({_COLUMNS}) from stdin") as copy:
            for change in changes:
                copy.write_row(change)
        cur.execute(_FROM_STAGE)


def _pipeline(conn: psycopg.Connection[tuple[object, ...]], changes: list[Change]) -> None:
    with conn.pipeline(), conn.cursor() as cur:
        cur.executemany(_UPSERT, changes)


def check_pg_view(conn: psycopg.Connection[tuple[object, ...]], w: Workload, count: int) -> None:
    if pg_rows_wrong(conn, w.expected(count)):
        raise AssertionError("store-only baseline wrote wrong rows")


def pg_rows_wrong(conn: psycopg.Connection[tuple[object, ...]], expected: Mapping[str, Row]) -> int:
    """How many accounts of the ``accounts`` table differ from ``expected`` in balance or
    event count: wrong, missing or not expected at all."""
    want = {k: (r.balance, r.events) for k, r in expected.items()}
    rows = conn.execute("select id, balance, applied_events from accounts").fetchall()
    found = {str(r[0]): (r[1], r[2]) for r in rows}
    return sum(1 for k, v in want.items() if found.get(k) != v) + len(found.keys() - want.keys())


_LUA = """
for i = 1, #KEYS do
  local o = (i - 1) * 3
  if ARGV[o + 3] ~= '' then redis.call('HSET', KEYS[i], 'owner', ARGV[o + 3]) end
  redis.call('HINCRBY', KEYS[i], 'balance', ARGV[o + 1])
  redis.call('HINCRBY', KEYS[i], 'events', ARGV[o + 2])
end
return #KEYS
"""


def redis_store_only(res: Resources, w: Workload, count: int, batch: int) -> list[Baseline]:
    """One Lua script per batch, then a pipelined MULTI/EXEC per batch."""
    prefix = res.redis_prefix()
    client = redis.Redis.from_url(res.svc.redis_url)
    script = client.register_script(_LUA)
    out = []
    try:
        for name in ("Lua script", "MULTI/EXEC"):
            base = f"{prefix}:{name[:3].lower()}:account:"
            started = time.perf_counter()
            for start in range(0, count, batch):
                changes = fold(w, start, min(count, start + batch))
                if name == "Lua script":
                    args = [v for c in changes for v in (c[2], c[5], c[1] or "")]
                    script(keys=[base + c[0] for c in changes], args=args, client=client)
                else:
                    _multi_exec(client, base, changes)
            seconds = time.perf_counter() - started
            out.append(Baseline("(b) store-only", count, seconds, name))
            check_redis_view(client, base, w, count)
    finally:
        client.close()
    return out


def _multi_exec(client: redis.Redis, base: str, changes: list[Change]) -> None:
    with client.pipeline(transaction=True) as pipe:
        for aid, owner, change, _d, _w, events, _seq in changes:
            if owner is not None:
                pipe.hset(base + aid, "owner", owner)
            pipe.hincrby(base + aid, "balance", change)
            pipe.hincrby(base + aid, "events", events)
        pipe.execute()


def check_redis_view(client: redis.Redis, base: str, w: Workload, count: int) -> None:
    expected = w.expected(count)
    with client.pipeline(transaction=False) as pipe:
        for aid in expected:
            pipe.hmget(base + aid, "balance", "events")
        got = pipe.execute()
    if [(int(b), int(e)) for b, e in got] != [(r.balance, r.events) for r in expected.values()]:
        raise AssertionError("store-only baseline wrote wrong hashes")


# ------------------------------------------------------------------------------ (c) naive


def pg_naive(res: Resources, topic: str, count: int) -> Baseline:
    """One autocommitted upsert (one transaction, one durable commit) per consumed event."""
    dsn = res.database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        fresh_table(conn)
        started, done = 0.0, 0
        for values in _messages(res.svc, topic, count):
            started = started or time.perf_counter()
            for value in values:
                conn.execute(_UPSERT, change_of(orjson.loads(value)))
            done += len(values)
        seconds = time.perf_counter() - started
    return Baseline("(c) naive", done, seconds, "a transaction per event")


def redis_naive(res: Resources, topic: str, count: int) -> Baseline:
    """A MULTI/EXEC per consumed event."""
    base = f"{res.redis_prefix()}:account:"
    client = redis.Redis.from_url(res.svc.redis_url)
    try:
        started, done = 0.0, 0
        for values in _messages(res.svc, topic, count):
            started = started or time.perf_counter()
            for value in values:
                _multi_exec(client, base, [change_of(orjson.loads(value))])
            done += len(values)
        seconds = time.perf_counter() - started
    finally:
        client.close()
    return Baseline("(c) naive", done, seconds, "a MULTI/EXEC per event")


def change_of(event: dict[str, object]) -> Change:
    data = event["data"]
    assert isinstance(data, dict)
    aid = str(event["stream"]).removeprefix("account:")
    seq = int(str(event["seq"]))
    if event["type"] == "OPENED":
        return (aid, str(data["owner"]), 0, 0, 0, 1, seq)
    amount = int(data["amount"])
    if event["type"] == "DEPOSITED":
        return (aid, None, amount, amount, 0, 1, seq)
    return (aid, None, -amount, 0, amount, 1, seq)
