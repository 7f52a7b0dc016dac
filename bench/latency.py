"""Produce→view latency at a given offered load.

A producer thread publishes the in-order workload at a steady rate, stamping each event's
``ts`` with the time it is produced; the delivery report tells each event's partition and
offset. The daemon runs (``--until-stopped``) as in production. A watcher reads the stored
checkpoints every ``POLL_SECONDS``: projector commits a partition's checkpoint in the same
transaction (Redis: the same script) as the view writes of the events before it, so the
moment the checkpoint passes an event's offset is the moment a reader of the view sees that
event. Latency = first time the watcher sees the checkpoint past the offset - the produce
stamp; it over-states by at most the poll interval.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message

from bench.context import (
    PROJECTION,
    Context,
    prepare,
    profile,
    projector_config,
    start_daemon,
)
from bench.projector_runs import _percentile
from bench.services import producer, resources
from projector.store.base import Store
from projector.store.connect import open_store

POLL_SECONDS = 0.005
SETTLE_SECONDS = 2.0  # after assignment, before the first event: the steady state is measured


@dataclass
class LatencyResult:
    store: str
    offered_rate: float
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    unseen: int
    problems: list[str]

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Watcher:
    """Reads the stored checkpoints in a loop and keeps every change with its time."""

    def __init__(self, store: Store, topic: str) -> None:
        self._store, self._topic = store, topic
        self.changes: dict[int, list[tuple[int, float]]] = {}  # partition -> (offset, seen at)
        self.latest: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def offsets(self) -> dict[int, int | None]:
        return {
            p: o for (t, p), o in self._store.checkpoints(PROJECTION).items() if t == self._topic
        }

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            now = time.time()
            for p, offset in self.offsets().items():
                if offset is not None and offset != self.latest.get(p):
                    self.latest[p] = offset
                    self.changes.setdefault(p, []).append((offset, now))

    def seen_at(self, partition: int, offset: int) -> float | None:
        """When the checkpoint of ``partition`` was first seen past ``offset``."""
        changes = self.changes.get(partition, [])
        k = bisect.bisect_right([o for o, _t in changes], offset)
        return changes[k][1] if k < len(changes) else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._store.close()


def measure_latency(ctx: Context, store: str, rate: float, seconds: float) -> LatencyResult:
    """Offer ``rate`` events/s for ``seconds`` (fewer if the workload runs out first)."""
    count = min(len(ctx.workload), int(rate * seconds))
    ctx.say(f"[bold]{store} latency[/]: {count:,} events at {rate:,.0f}/s")
    problems: list[str] = []
    with resources(ctx.svc) as res:
        topic = res.topic(ctx.partitions)
        warm_up = res.topic(1)  # the producer's first delivery, not measured
        dsn = res.database() if store == "postgres" else None
        prefix = res.redis_prefix() if store == "redis" else None
        path = ctx.out / f"{store}-latency.yaml"
        data = projector_config(ctx, store, topic, dsn=dsn, prefix=prefix)
        res.group(f"{data['kafka']['group_prefix']}.{PROJECTION}")
        config = prepare(data, path)
        proc = start_daemon(path, ctx.out / f"{store}-latency.json", until_stopped=True)
        spy = profile(proc.pid, ctx.out / f"{store}-latency.pyspy.txt") if ctx.profile else None
        watcher = Watcher(open_store(config, config.projections[0]), topic)
        sent: list[tuple[int, int, float]] = []
        elapsed = 0.0
        try:
            _wait_assigned(watcher, ctx.partitions)
            time.sleep(SETTLE_SECONDS)
            watcher.start()
            sent, elapsed = _produce(ctx, topic, rate, count, warm_up)
            _wait_caught_up(watcher, sent)
        except TimeoutError as exc:
            problems.append(str(exc))
        finally:
            watcher.stop()
            proc.terminate()
            if proc.wait(60) != 0:
                problems.append(f"the daemon exited with code {proc.returncode}")
            if spy is not None:
                spy.wait(30)
    latencies, unseen = [], 0
    for partition, offset, stamp in sent:
        seen = watcher.seen_at(partition, offset)
        if seen is None:
            unseen += 1
        else:
            latencies.append((seen - stamp) * 1000)
    latencies.sort()
    return LatencyResult(
        store=store,
        offered_rate=rate,
        events=len(sent),
        seconds=elapsed,
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p99_ms=_percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else 0.0,
        unseen=unseen,
        problems=problems,
    )


def _wait_assigned(watcher: Watcher, partitions: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(watcher.offsets()) >= partitions:
                return
        except Exception:  # the daemon has not made its state yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the daemon was not assigned its partitions within {timeout:.0f}s")


def _produce(
    ctx: Context, topic: str, rate: float, count: int, warm_up: str
) -> tuple[list[tuple[int, int, float]], float]:
    """The first ``count`` events of the ordered log, paced at ``rate``; each one's
    (partition, offset, produce stamp). The producer first delivers a message to the
    ``warm_up`` topic and reads ``topic``'s metadata: its connection and its idempotent
    producer id take about half a second, which is the benchmark's start, not projector's
    latency (measured: they put the first second's events at 200-900 ms)."""
    prod = producer(ctx.svc.kafka, **{"linger.ms": 5})
    prod.produce(warm_up, b"warm-up")
    if prod.flush(30) != 0:
        raise TimeoutError("the latency producer could not deliver its warm-up message")
    prod.list_topics(topic, timeout=30)
    sent: list[tuple[int, int, float]] = []
    w = ctx.workload

    def report(stamp: float) -> Any:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                sent.append((msg.partition() or 0, msg.offset() or 0, stamp))

        return delivered

    started = time.perf_counter()
    i = 0
    while i < count:
        due = min(count, int((time.perf_counter() - started) * rate) + 1)
        while i < due:
            stamp = time.time()
            value = w.payload(i, ts=int(stamp * 1000))
            prod.produce(topic, value, ctx.keys[i], on_delivery=report(stamp))
            i += 1
        prod.poll(0)
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    prod.flush(30)
    return sent, elapsed


def _wait_caught_up(
    watcher: Watcher, sent: list[tuple[int, int, float]], timeout: float = 60
) -> None:
    ends: dict[int, int] = {}
    for partition, offset, _stamp in sent:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(watcher.latest.get(p, 0) >= end for p, end in ends.items()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the view did not catch up within {timeout:.0f}s of the last event")
