"""projector's runs: a topic already published, one or more daemon processes in one consumer
group that exit when caught up, the reference replay responder serving their gaps, a sampler
that reads the stored checkpoints every 0.5 s, and a check of the view against the workload's
answer afterwards."""

from __future__ import annotations

import re
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from bench import cpu
from bench.context import (
    EVENT_STORE,
    PROJECTION,
    Context,
    prepare,
    profile,
    projector_config,
    read_result,
    start_daemon,
)
from bench.services import Resources, end_offsets, resources, unique
from bench.workload import Delivery
from projector.config import Config
from projector.replay.responder import ReplayResponder
from projector.store.base import Store
from projector.store.connect import open_store

SAMPLE_SECONDS = 0.5


@dataclass
class RunResult:
    name: str
    store: str
    processes: int
    messages: int  # published on the source topic (duplicates included, withheld not)
    seconds: float  # first batch started to last batch committed
    p50_ms: float
    p99_ms: float
    batches: int
    peak_rss_mb: float
    peak_parked: int
    # CPU seconds during the run: daemon(s), harness, pg, kafka, redis, and "other": what the
    # rest of the machine used meanwhile (another test suite, say), which the figures suffer
    cpu: dict[str, float]
    wall: float  # seconds from the daemons' start to their exit, the window of ``cpu``
    problems: list[str]
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # t, lag, parked

    @property
    def topic_read(self) -> float | None:
        """Seconds until the stored checkpoints first reached the source topic's end; what
        follows is waiting for the withheld events' replays (at least gap_timeout)."""
        found = next((t for t, lag, _p in self.samples if lag == 0), None)
        return None if found is None else min(found, self.seconds)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "events_per_s": self.rate, "topic_read_s": self.topic_read}


class Sampler:
    """Every 0.5 s: the stored checkpoints (so the lag behind the topic's end) and the number
    of parked events, read from the store as any reader would."""

    def __init__(self, store: Store, ends: dict[int, int], topic: str) -> None:
        self._store, self._ends, self._topic = store, ends, topic
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        total = sum(self._ends.values())
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                offsets = self._store.checkpoints(PROJECTION)
                parked = self._store.count_parked(PROJECTION)
            except Exception:  # the store is not set up yet, or busy: try again next time
                continue
            read = sum(o or 0 for (t, _p), o in offsets.items() if t == self._topic)
            self.samples.append((time.time(), total - read, parked))

    def stop(self) -> list[tuple[float, int, int]]:
        self._stop.set()
        self._thread.join(10)
        self._store.close()
        return self.samples


def run_projector(
    ctx: Context, name: str, store: str, topic: str, delivery: Delivery, processes: int = 1
) -> RunResult:
    """Run projector on ``topic`` (``delivery`` published on it) until caught up."""
    ctx.say(f"[bold]{name}[/]: {processes} process(es), {len(delivery.order):,} messages")
    with resources(ctx.svc) as res:
        config = _configure(ctx, res, name, store, topic)
        ends = end_offsets(ctx.svc.kafka, topic)
        sampler = Sampler(open_store(config, config.projections[0]), ends, topic).start()
        slug = _slug(name)
        results = [ctx.out / f"{slug}-{k}.json" for k in range(processes)]
        for path in results:
            path.unlink(missing_ok=True)
        ports = cpu.ports(ctx.svc.kafka, ctx.svc.pg_dsn, ctx.svc.redis_url)
        services_before, own_before, wall_started = (
            cpu.snapshot(ports),
            _own_cpu(),
            time.monotonic(),
        )
        procs = [start_daemon(ctx.out / f"{slug}.yaml", path) for path in results]
        spy = [profile(procs[0].pid, ctx.out / f"{slug}.pyspy.txt")] if ctx.profile else []
        timeout = 120 + len(delivery.order) / 1_000
        problems = _wait(procs, timeout)
        for spying in spy:
            spying.wait(30)
        after = cpu.snapshot(ports)
        cpu_used = {"harness": _own_cpu() - own_before, **cpu.used(services_before, after)}
        wall = time.monotonic() - wall_started
        samples = sampler.stop()
        problems += check_view(ctx, config, store)
    outs = [read_result(p) for p in results]
    cpu_used["daemon"] = sum(out.get("cpu_seconds", 0.0) for out in outs)
    ours = sum(v for k, v in cpu_used.items() if k != "machine")
    cpu_used["other"] = round(max(0.0, cpu_used.pop("machine") - ours), 2)
    return _result(name, store, delivery, outs, samples, problems, cpu_used, wall)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _slug(name: str) -> str:
    """A run's name as a file name: "pg reordered, 2 consumers" -> "pg-reordered-2-consumers"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _configure(ctx: Context, res: Resources, name: str, store: str, topic: str) -> Config:
    # The replay topic partitioned like the source (docs/replay.md, "Several instances"), so
    # that with several instances a stream's replays reach its own member.
    requests, replayed = res.topic(1), res.topic(ctx.partitions)
    dsn = res.database() if store == "postgres" else None
    prefix = res.redis_prefix() if store == "redis" else None
    data = projector_config(ctx, store, topic, dsn=dsn, prefix=prefix, replay=(requests, replayed))
    res.group(f"{data['kafka']['group_prefix']}.{PROJECTION}")
    config = prepare(data, ctx.out / f"{_slug(name)}.yaml")
    schema, table = EVENT_STORE
    responder = ReplayResponder(
        ctx.svc.kafka,
        ctx.events_dsn,
        replayed,
        requests_topic=requests,
        group=res.group(unique("responder")),
        schema=schema,
        table=table,
    )
    stop = threading.Event()
    thread = threading.Thread(target=responder.run, args=(stop,), name="responder", daemon=True)
    thread.start()

    def stop_responder() -> None:
        stop.set()
        thread.join(30)
        responder.close()

    res.on_close(stop_responder)
    return config


def _wait(procs: list[Any], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    for proc in procs:
        try:
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        except Exception:
            proc.terminate()
            code = proc.wait(30)
            problems.append(f"not caught up within {timeout:.0f}s: stopped")
        if code != 0:
            problems.append(f"a daemon exited with code {code}")
    return problems


def _result(
    name: str,
    store: str,
    delivery: Delivery,
    outs: list[dict[str, Any]],
    samples: list[tuple[float, int, int]],
    problems: list[str],
    cpu_used: dict[str, float],
    wall: float,
) -> RunResult:
    batches = [b for out in outs for b in out.get("batches", [])]
    if not batches:
        problems.append("no batch was applied")
        n = len(delivery.order)
        return RunResult(name, store, len(outs), n, 0, 0, 0, 0, 0, 0, cpu_used, wall, problems)
    first = min(end - seconds for end, seconds, _n, _a in batches)
    last = max(end for end, _s, _n, _a in batches)
    apply_ms = sorted(seconds * 1000 for _e, seconds, _n, _a in batches)
    return RunResult(
        name=name,
        store=store,
        processes=len(outs),
        messages=len(delivery.order),
        seconds=last - first,
        p50_ms=statistics.median(apply_ms),
        p99_ms=_percentile(apply_ms, 0.99),
        batches=len(batches),
        peak_rss_mb=max(out.get("peak_rss_bytes", 0) for out in outs) / 2**20,
        peak_parked=max((parked for _t, _l, parked in samples), default=0),
        cpu=cpu_used,
        wall=wall,
        problems=problems,
        samples=[(t - first, lag, parked) for t, lag, parked in samples],
    )


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def check_view(ctx: Context, config: Config, store: str) -> list[str]:
    """The view against the workload's answer, and nothing left parked, open or dead."""
    problems: list[str] = []
    state = open_store(config, config.projections[0])
    try:
        for what, count in (
            ("parked", state.count_parked(PROJECTION)),
            ("open gaps", state.count_open_gaps(PROJECTION)),
            ("dead letters", state.count_open_dead_letters(PROJECTION)),
        ):
            if count:
                problems.append(f"{count} {what} left")
    finally:
        state.close()
    actual = _pg_view(config) if store == "postgres" else _redis_view(config)
    expected = {k: (r.owner, r.balance, r.events) for k, r in ctx.expected().items()}
    wrong = sum(1 for k, v in expected.items() if actual.get(k) != v)
    wrong += len(actual.keys() - expected.keys())
    if wrong:
        problems.append(f"{wrong} of {len(expected)} view rows wrong")
    return problems


def _pg_view(config: Config) -> dict[str, tuple[str, int, int]]:
    dsn = config.postgres_config().dsn.get_secret_value()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"select id, owner, balance, applied_events from {PROJECTION}.accounts")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _redis_view(config: Config) -> dict[str, tuple[str, int, int]]:
    cfg = config.redis_config()
    client = redis.Redis.from_url(cfg.url.get_secret_value(), decode_responses=True)
    try:
        version = str(client.get(f"{cfg.prefix}:v:{PROJECTION}:active"))
        base = f"{cfg.prefix}:v:{PROJECTION}:{version}:account:"
        keys = [k for k in client.scan_iter(match=base + "*", count=5000)]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = pipe.execute()
    finally:
        client.close()
    return {
        k.removeprefix(base): (h.get("owner", ""), int(h.get("balance", 0)), int(h["events"]))
        for k, h in zip(keys, hashes, strict=True)
    }
