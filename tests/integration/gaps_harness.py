"""Helpers for gap and replay tests: a clock the test moves, the daemon in a thread, and a
reader of the replay request topic."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import Consumer

from projector.config import Config
from projector.runner.daemon import Daemon, run
from tests.conftest import unique


class FakeClock:
    """The daemon's clock (gap ages, request schedule); Kafka and PostgreSQL keep real time."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@contextmanager
def daemon_thread(config: Config, clock: Callable[[], float]) -> Iterator[dict[str, int]]:
    """Run the daemon in a thread until the block ends; yields where its exit code lands."""
    stop = threading.Event()
    outcome: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(code=run(config, clock=clock, stop=stop))
    )
    thread.start()
    try:
        yield outcome
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the daemon did not stop"


def wait_until(check: Callable[[], Any], what: str, limit: float = 60) -> Any:
    """Poll a condition (bounded); returns its first truthy value."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


class RequestReader:
    """Reads replay requests from the request topic, from the beginning."""

    def __init__(self, bootstrap: str, topic: str):
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("reader"),
                "auto.offset.reset": "earliest",
            }
        )
        self._consumer.subscribe([topic])
        self.seen: list[dict[str, Any]] = []

    def read(self, count: int, limit: float = 30) -> list[dict[str, Any]]:
        """Wait (bounded) until ``count`` requests in all have been read; return them all."""
        deadline = time.monotonic() + limit
        while len(self.seen) < count and time.monotonic() < deadline:
            for msg in self._consumer.consume(num_messages=100, timeout=0.2):
                if msg.error() is None:
                    self.seen.append(json.loads(msg.value() or b"{}"))
        return self.seen

    def close(self) -> None:
        self._consumer.close()


@contextmanager
def running_daemon(config: Config, clock: Callable[[], float]) -> Iterator[Daemon]:
    """The daemon (metrics server included, if enabled) in a thread until the block ends."""
    stop = threading.Event()
    daemon = Daemon(config, clock=clock, stop=stop)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        yield daemon
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the daemon did not stop"
