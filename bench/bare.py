"""(e) the bare pipeline: the least an exactly-once Kafka consumer in Python does, with none of
projector's ordering. It reads the in-order topic in batches of up to 2,000 messages, decodes
each with orjson, folds the batch to one change per account, and writes the changes with the
batch's offsets in one transaction:

- PostgreSQL: COPY into a temporary table, one INSERT ... ON CONFLICT (as (b)), and an upsert
  of each partition's next offset;
- Redis: one Lua script that adds the changes and sets the offsets.

It then commits the offsets to Kafka asynchronously. It keeps no sequence, so it has no
positions, no de-duplication, no parking, no gaps and no fencing. It is right only on the
in-order topic, which is where it runs, and its view is checked there.

It runs in one process, then in two, with the topic's partitions split between them. The two
figures show how much one Python thread and the two cores allow when the per-event work is
this small, beside projector's figures.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Event as StartSignal
from typing import Any

import orjson
import psycopg
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench import cpu
from bench.baselines import (
    STAGE,
    Baseline,
    Change,
    change_of,
    check_pg_view,
    check_redis_view,
    copy_batch,
    fresh_table,
)
from bench.services import Resources, Services, end_offsets, unique
from bench.workload import Workload

NAME = "(e) bare pipeline"
TWO = "(e) bare pipeline, two processes"
SERVICE = {"postgres": "pg", "redis": "redis"}  # as bench.cpu names them

Offsets = dict[int, int]  # partition -> the next offset to read
WriteBatch = Callable[[list[Change], Offsets], None]

_CHECKPOINTS = (
    "create table if not exists checkpoints"
    " (topic text, partition int, next_offset bigint, primary key (topic, partition))"
)
_SAVE_CHECKPOINT = (
    "insert into checkpoints values (%s, %s, %s)"
    " on conflict (topic, partition) do update set next_offset = excluded.next_offset"
)
# KEYS: the accounts' hashes, then the checkpoint hash. ARGV: per account its balance change,
# event count and owner ('' if not opened in the batch), then partition/offset pairs.
_LUA = """
local n = #KEYS - 1
for i = 1, n do
  local o = (i - 1) * 3
  if ARGV[o + 3] ~= '' then redis.call('HSET', KEYS[i], 'owner', ARGV[o + 3]) end
  redis.call('HINCRBY', KEYS[i], 'balance', ARGV[o + 1])
  redis.call('HINCRBY', KEYS[i], 'events', ARGV[o + 2])
end
for j = n * 3 + 1, #ARGV, 2 do redis.call('HSET', KEYS[#KEYS], ARGV[j], ARGV[j + 1]) end
return n
"""


@dataclass(frozen=True)
class Share:
    """What one process of the bare pipeline reads, and where it writes."""

    svc: Services
    store: str
    topic: str
    partitions: list[int]
    ends: Offsets
    target: str  # PostgreSQL: the database's DSN; Redis: the key prefix


def bare_pipeline(res: Resources, store: str, topic: str, w: Workload) -> list[Baseline]:
    """The bare pipeline on the whole in-order ``topic``, in one process then in two, each on
    a fresh view that is checked against the workload's answer."""
    ends = end_offsets(res.svc.kafka, topic)
    ports = cpu.ports(res.svc.kafka, res.svc.pg_dsn, res.svc.redis_url)
    out = []
    for name, processes in ((NAME, 1), (TWO, 2)):
        target = _fresh_view(res, store)
        shares = [
            Share(res.svc, store, topic, sorted(ends)[k::processes], ends, target)
            for k in range(processes)
        ]
        before = cpu.snapshot(ports)
        events, seconds, own = _run(shares)
        on_store = cpu.used(before, cpu.snapshot(ports))[SERVICE[store]]
        _check_view(res, store, target, w)
        detail = (
            f"no order kept; CPU per event: Python {1e6 * own / events:.1f} us,"
            f" {store} {1e6 * on_store / events:.1f} us"
        )
        out.append(Baseline(name, events, seconds, detail))
    return out


def _fresh_view(res: Resources, store: str) -> str:
    if store == "redis":
        return res.redis_prefix()
    dsn = res.database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        fresh_table(conn)
        conn.execute(_CHECKPOINTS)
    return dsn


def _check_view(res: Resources, store: str, target: str, w: Workload) -> None:
    if store == "redis":
        client = redis.Redis.from_url(res.svc.redis_url)
        try:
            check_redis_view(client, f"{target}:account:", w, len(w))
        finally:
            client.close()
    else:
        with psycopg.connect(target) as conn:
            check_pg_view(conn, w, len(w))


def _run(shares: list[Share]) -> tuple[int, float, float]:
    """Run one process per share; they start consuming together. Returns the events, the
    seconds from the first batch of any to the last commit of all, and the CPU seconds the
    processes used (librdkafka's threads included)."""
    spawn = multiprocessing.get_context("spawn")  # no copy of the harness's Kafka threads
    start = spawn.Event()
    done: multiprocessing.Queue[tuple[float, float, int, float]] = spawn.Queue()
    procs = [spawn.Process(target=_process, args=(s, start, done)) for s in shares]
    for p in procs:
        p.start()
    start.set()
    found: list[tuple[float, float, int, float]] = []
    deadline = time.monotonic() + 600
    while len(found) < len(procs):
        try:
            found.append(done.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"the bare pipeline failed (exit codes {failed})") from None
    for p in procs:
        p.join(30)
    events = sum(f[2] for f in found)
    seconds = max(f[1] for f in found) - min(f[0] for f in found)
    return events, seconds, sum(f[3] for f in found)


def _process(share: Share, start: StartSignal, done: multiprocessing.Queue[Any]) -> None:
    """One process: consume its partitions to their ends, writing each batch as it comes."""
    consumer = Consumer(
        {
            "bootstrap.servers": share.svc.kafka,
            "group.id": unique("bench-bare"),
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "fetch.queue.backoff.ms": 1,  # as (a): the default stalls a fast consumer
        }
    )
    consumer.assign([TopicPartition(share.topic, p, OFFSET_BEGINNING) for p in share.partitions])
    want = sum(share.ends[p] for p in share.partitions)
    with _writer(share) as write:
        start.wait(60)
        cpu_before = time.process_time()  # not the imports and connecting
        seen, started = 0, 0.0
        deadline = time.monotonic() + 600
        while seen < want and time.monotonic() < deadline:
            messages = [m for m in consumer.consume(2000, 0.05) if not m.error()]
            if not messages:
                continue
            started = started or time.time()
            changes: dict[str, list[Any]] = {}
            offsets: Offsets = {}
            for m in messages:
                aid, owner, balance, deposits, withdrawals, events, seq = change_of(
                    orjson.loads(m.value() or b"")
                )
                c = changes.get(aid)
                if c is None:
                    changes[aid] = [owner, balance, deposits, withdrawals, events, seq]
                else:
                    c[0] = owner or c[0]
                    c[1] += balance
                    c[2] += deposits
                    c[3] += withdrawals
                    c[4] += events
                    c[5] = seq
                part, offset = m.partition(), m.offset()
                assert part is not None and offset is not None  # a fetched message has both
                offsets[part] = offset + 1
            write([(aid, *c) for aid, c in sorted(changes.items())], offsets)
            consumer.commit(
                offsets=[TopicPartition(share.topic, p, o) for p, o in offsets.items()],
                asynchronous=True,
            )
            seen += len(messages)
        done.put((started, time.time(), seen, time.process_time() - cpu_before))
    consumer.close()


@contextmanager
def _writer(share: Share) -> Iterator[WriteBatch]:
    """The store side of one process: a ``WriteBatch`` on its own connection."""
    if share.store == "redis":
        client = redis.Redis.from_url(share.svc.redis_url)
        script = client.register_script(_LUA)
        base, checkpoints = f"{share.target}:account:", f"{share.target}:checkpoints"

        def write_redis(changes: list[Change], offsets: Offsets) -> None:
            keys = [base + c[0] for c in changes] + [checkpoints]
            args: list[Any] = [v for c in changes for v in (c[2], c[5], c[1] or "")]
            args += [v for p, o in offsets.items() for v in (p, o)]
            script(keys=keys, args=args, client=client)

        try:
            yield write_redis
        finally:
            client.close()
        return
    with psycopg.connect(share.target, autocommit=True) as conn:
        conn.execute(STAGE)

        def write_pg(changes: list[Change], offsets: Offsets) -> None:
            with conn.transaction():
                copy_batch(conn, changes)
                with conn.cursor() as cur:
                    cur.executemany(
                        _SAVE_CHECKPOINT, [(share.topic, p, o) for p, o in offsets.items()]
                    )

        yield write_pg
