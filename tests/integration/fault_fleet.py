"""Helpers for the fault scenarios that run several daemons as real processes: a fleet of
``projector run`` processes (each with its own config, instance id and log, all stopped at the
end whatever happens), a sampler that watches the stored checkpoints never go back, a sampler
of a process's resident memory, and the comparison of the accounts view with its oracle."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import psycopg
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import Services, unique
from tests.integration.fault_run import Daemon, one
from tests.integration.harness import write_config

Row = dict[str, Any]
T = TypeVar("T")
TopicPartition = tuple[str, int]

REVOKED = re.compile(r"projector\.source\.kafka: revoked (?!nothing)")
FENCED = "fenced: another instance owns"


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class Fleet:
    """Daemon processes sharing one config (but each its own instance id); every one is
    killed at the end of the ``fleet()`` block if still running."""

    def __init__(self, data: dict[str, Any], tmp_path: Path):
        self.data = data
        self.tmp_path = tmp_path
        self.instances: dict[str, Daemon] = {}

    def start(self, name: str, env: dict[str, str] | None = None) -> Daemon:
        data = {**self.data, "kafka": {**self.data["kafka"], "instance_id": f"fault-{name}"}}
        path = write_config(self.tmp_path / f"{name}.yaml", data)
        instance = Daemon(path, self.tmp_path / f"{name}.log", env or {}, name=name)
        self.instances[name] = instance
        return instance.start()

    def __getitem__(self, name: str) -> Daemon:
        return self.instances[name]

    def running(self) -> list[Daemon]:
        return [i for i in self.instances.values() if i.alive()]

    def count(self, pattern: re.Pattern[str] | str) -> int:
        return sum(i.count(pattern) for i in self.instances.values())

    def logs(self) -> str:
        return "\n".join(f"--- {n}:\n{tail(i.log)}" for n, i in self.instances.items())

    def check_alive(self, names: list[str]) -> None:
        dead = {
            n: i.proc.returncode
            for n in names
            if (i := self.instances[n]).proc is not None and not i.alive()
        }
        assert not dead, f"instance(s) exited unexpectedly, codes {dead}:\n{self.logs()}"

    def close(self) -> None:
        for instance in self.instances.values():
            instance.reap()


@contextmanager
def fleet(data: dict[str, Any], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(data, tmp_path)
    try:
        yield f
    finally:
        f.close()


class Sampler(Generic[T]):
    """Calls ``read`` every ``interval`` seconds in a thread while the ``with`` block runs and
    keeps ``(monotonic time, value)``; a ``read`` that raises ends the sampling (its error is
    kept in ``errors``, for the test to assert on)."""

    def __init__(self, read: Callable[[], T], interval: float, name: str = "sampler"):
        self.read = read
        self.interval = interval
        self.samples: list[tuple[float, T]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.close()

    def close(self) -> None:
        """Release what ``read`` holds (a connection)."""

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.read()
            except Exception as exc:  # the sampler must not die silently
                self.errors.append(repr(exc))
                return
            self.samples.append((time.monotonic(), value))
            self._stop.wait(self.interval)  # the sampling period

    def values(self, start: float = 0.0, end: float = float("inf")) -> list[T]:
        return [v for t, v in self.samples if start <= t <= end]

    def last(self) -> T:
        return self.samples[-1][1]


Checkpoints = dict[TopicPartition, tuple[int, int, str]]


class CheckpointSampler(Sampler[Checkpoints]):
    """The projection's checkpoint rows (next offset, epoch, owner per partition), read every
    100 ms on a connection of its own. ``regressions()`` lists every time a partition's next
    offset or epoch went down, or its row vanished."""

    def __init__(self, dsn: str, projection: str, interval: float = 0.1):
        super().__init__(self._read, interval, "checkpoint-sampler")
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.projection = projection

    def _read(self) -> Checkpoints:
        found = self.conn.execute(
            "select topic, partition, coalesce(next_offset, -1), epoch, owner"
            " from projector.checkpoints where projection = %s",
            (self.projection,),
        ).fetchall()
        return {(t, p): (o, e, w) for t, p, o, e, w in found}

    def close(self) -> None:
        self.conn.close()

    def regressions(self) -> list[str]:
        out: list[str] = []
        for (_, before), (_, after) in itertools.pairwise(self.samples):
            for tp, (offset, epoch, _owner) in after.items():
                was_offset, was_epoch, _ = before.get(tp, (-1, 0, ""))
                if offset < was_offset or epoch < was_epoch:
                    out.append(f"{tp}: offset {was_offset}->{offset}, epoch {was_epoch}->{epoch}")
            out += [f"{tp} vanished" for tp in before if tp not in after]
        return out

    def current(self) -> Checkpoints:
        return self.last() if self.samples else {}


def rss_kb(pid: int) -> int:
    """The resident set size of process ``pid``, from /proc (kB)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))


def committed(dsn: str, projection: str) -> int:
    """The sum of the projection's stored checkpoints (= messages consumed, offsets from 0)."""
    return int(
        one(
            dsn,
            "select coalesce(sum(next_offset), 0) from projector.checkpoints where projection = %s",
            (projection,),
        )
    )


def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    """The high watermark of every partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fault-fleet-reader"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            (topic, p): consumer.get_watermark_offsets(
                KafkaTopicPartition(topic, p), timeout=10, cached=False
            )[1]
            for p in sorted(meta.partitions)
        }
    finally:
        consumer.close()


def owners(dsn: str, projection: str) -> dict[TopicPartition, str]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "select topic, partition, owner from projector.checkpoints where projection = %s",
            (projection,),
        ).fetchall()
    return {(t, p): o for t, p, o in found}


@dataclass(frozen=True)
class Comparison:
    """The accounts view against its oracle: rows that differ (missing, extra, or any column
    off) and events applied twice (the per-row apply counter above the oracle's)."""

    rows: int
    differing: int
    applied_twice: int
    examples: list[tuple[str, Row | None, Row | None]]

    @property
    def equal(self) -> bool:
        return self.differing == 0


def compare_accounts(found: dict[str, Row], oracle: dict[str, Row]) -> Comparison:
    ids = sorted(set(found) | set(oracle))
    off = [i for i in ids if found.get(i) != oracle.get(i)]
    twice = sum(
        max(0, int(found[i]["applied_events"]) - int(oracle[i]["applied_events"]))
        for i in ids
        if i in found and i in oracle
    )
    return Comparison(
        len(found), len(off), twice, [(i, found.get(i), oracle.get(i)) for i in off[:3]]
    )


@contextmanager
def fresh_database(services: Services) -> Iterator[str]:
    """A database of its own (for a run shared by several tests, where the function-scoped
    ``pg_dsn`` fixture can't serve), dropped afterwards."""
    name = unique("t")
    with psycopg.connect(services.pg_dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    params = conninfo_to_dict(services.pg_dsn)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        with psycopg.connect(services.pg_dsn, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@contextmanager
def fresh_topics(services: Services, **partitions: int) -> Iterator[dict[str, str]]:
    """Topics of their own (``role=partitions``), deleted afterwards."""
    admin = AdminClient({"bootstrap.servers": services.kafka})
    names = {role: unique("topic") for role in partitions}
    futures = admin.create_topics(
        [NewTopic(names[role], count, 1) for role, count in partitions.items()],
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=30)
    try:
        yield names
    finally:
        for future in admin.delete_topics(list(names.values()), operation_timeout=30).values():
            future.result(timeout=30)
