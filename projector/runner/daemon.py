"""``projector run``: worker threads per projection (``consumers`` of them, one by default),
clean shutdown on SIGTERM/SIGINT.

SIGTERM lets each worker finish its batch, commit it, close its consumer (a static member does
not leave the group) and return; the outbox publishers (one thread per projection with
``correlation.outbox``, :mod:`projector.runner.outbox`) finish their round and stop after the
workers; the process exits 0. A worker that dies of a non-transient
error stops the others and the process exits non-zero, for systemd or Kubernetes to restart.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from projector.config import Config
from projector.metrics import Metrics, StoreCollector
from projector.runner.batch import Clock
from projector.runner.compaction import kafka_policies, warn_if_compacted
from projector.runner.gap_timer import ProjectionFailed
from projector.runner.identity import instance_id
from projector.runner.ops_server import OpsServer
from projector.runner.outbox import OutboxPublisher, build_publisher
from projector.runner.replay_layout import kafka_partitions, warn_if_replays_land_elsewhere
from projector.runner.worker import ProjectionWorker, load_handlers
from projector.store.connect import StoreSet

log = logging.getLogger(__name__)


def check_ready_to_run(config: Config) -> None:
    """``projector run`` never changes the schema: it refuses one that is behind."""
    stores = StoreSet(config)
    try:
        stores.check(config.projections, [load_handlers(p) for p in config.projections])
    finally:
        stores.close()


class Daemon:
    """The worker threads of the selected projections, and the ops HTTP server."""

    def __init__(
        self,
        config: Config,
        projections: list[str] | None = None,
        exit_when_caught_up: bool = False,
        clock: Clock = time.time,
        stop: threading.Event | None = None,
        metrics: Metrics | None = None,
    ):
        check_ready_to_run(config)
        self.config = config
        self.clock = clock
        self.stop = stop or threading.Event()
        self.metrics = metrics or Metrics()
        self.failures: list[BaseException] = []
        self.instance = instance_id(config.kafka.instance_id, scope=config.kafka.group_prefix)
        instance = self.instance.value
        selected = [p for p in config.projections if not projections or p.name in projections]
        self.projections = selected
        if any(p.correlation is not None for p in selected):
            policies = kafka_policies(config, timeout=5.0)  # brokers away: start anyway
            for proj in selected:  # a compacted correlation topic (docs/correlation.md, 8)
                warn_if_compacted(proj, policies)
        if any(p.replay_topic is not None for p in selected):
            counts = kafka_partitions(config, timeout=5.0)  # brokers away: start anyway
            strategy = str(config.kafka.consumer.get("partition.assignment.strategy", ""))
            for proj in selected:  # replays applied by another member (docs/replay.md)
                warn_if_replays_land_elsewhere(proj, counts, strategy)
        self.workers = [
            ProjectionWorker(
                config,
                p,
                member_id(instance, n),
                self.stop,
                clock,
                exit_when_caught_up,
                self.metrics,
                first=n == 0,
            )
            for p in selected
            for n in range(p.consumers)
        ]
        # Stopped once the workers are: a burst run's publishers then publish what is left.
        self._halt_publishers = threading.Event()
        built = [
            build_publisher(config, p, self._halt_publishers, clock, self.metrics) for p in selected
        ]
        self.publishers = [p for p in built if p is not None]
        for publisher in self.publishers:
            publisher.drain = exit_when_caught_up
        self._figures_stores = StoreSet(config)
        self.collector = StoreCollector(
            [p.name for p in selected],
            self._figures_stores.figures,
            self._figures_stores.close,
            clock,
        )
        self.metrics.registry.register(self.collector)
        self.ops: OpsServer | None = None
        if config.metrics.enabled:
            m = config.metrics
            self.ops = OpsServer(m.host, m.port, self.metrics.registry, self.healthy, self.ready)

    def healthy(self) -> tuple[bool, str]:
        """Every poll loop went round within ``stall_after``."""
        limit = self.config.metrics.stall_after
        now = time.monotonic()
        stalled = sorted({w.projection.name for w in self.workers if now - w.heartbeat > limit})
        if stalled:
            return False, f"poll loop stalled for more than {limit:.0f}s: {', '.join(stalled)}"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Every projection caught up (within ready_max_lag) and no gap older than
        ready_max_gap_age."""
        reasons = [w.ready() for w in self.workers]
        max_age = self.config.metrics.ready_max_gap_age
        if max_age is not None:
            with self.collector.lock:
                figures = self._figures_stores.figures(
                    [p.name for p in self.projections], self.clock()
                )
            reasons += [
                (
                    False,
                    f"{f.projection}: a gap is {f.oldest_gap_age:.0f}s old (ready_max_gap_age {max_age:.0f}s)",
                )
                for f in figures
                if f.oldest_gap_age > max_age
            ]
        not_ready = [reason for ok, reason in reasons if not ok]
        return (False, "; ".join(not_ready)) if not_ready else (True, "ready")

    def run(self) -> int:
        with collecting_less_often():
            return self._run()

    def _run(self) -> int:
        in_main = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        threads = [
            threading.Thread(
                target=self._guarded, args=(w,), name=f"projection-{w.projection.name}{w.suffix}"
            )
            for w in self.workers
        ]
        publishing = [
            threading.Thread(
                target=self._guarded_publisher, args=(p,), name=f"outbox-{p.projection}"
            )
            for p in self.publishers
        ]
        if self.ops is not None:
            self.ops.start()
        try:
            for t in [*threads, *publishing]:
                t.start()
            _join(threads)
            self._halt_publishers.set()
            _join(publishing)
        finally:
            self._halt_publishers.set()
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.ops is not None:
                self.ops.stop()
            # A scrape after the end must not reopen the store's connection (and leak it).
            self.metrics.registry.unregister(self.collector)
            self._figures_stores.close()
            self.instance.release()
        return 1 if self.failures else 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the current batches, then exiting", signal.Signals(signum).name)
        for p in self.publishers:
            p.drain = False
        self.stop.set()

    def _guarded_publisher(self, publisher: OutboxPublisher) -> None:
        """A publisher that dies of a non-transient error stops the daemon, as a worker does."""
        try:
            publisher.run()
        except BaseException as exc:
            log.exception("outbox publisher of %s failed: %s", publisher.projection, exc)
            self.failures.append(exc)
            self.stop.set()

    def _guarded(self, worker: ProjectionWorker) -> None:
        returned = False
        try:
            worker.run()
            returned = True
        except ProjectionFailed as exc:
            log.error("%s", exc)
            self.failures.append(exc)
            self.stop.set()
        except BaseException as exc:
            log.exception("projection %s failed: %s", worker.projection.name, exc)
            self.failures.append(exc)
            self.stop.set()
        finally:
            # confluent-kafka can raise a KafkaError, which is no BaseException: no except
            # clause catches it, yet the worker is dead. The daemon must not exit 0 then.
            if not returned and not self.failures:
                log.error("projection %s died: %r", worker.projection.name, sys.exc_info()[1])
                self.failures.append(RuntimeError(f"projection {worker.projection.name} died"))
                self.stop.set()


def member_id(instance: str, n: int) -> str:
    """The static group member id of a projection's ``n``-th consumer in this process: the
    instance id for the first (as with one consumer), ``<instance>-c<n>`` for the others, so
    each is as stable across restarts as the instance id."""
    return instance if n == 0 else f"{instance}-c{n}"


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)  # join with a timeout so signals reach the main thread


@contextmanager
def collecting_less_often() -> Iterator[None]:
    """Python's cyclic garbage collector runs whenever the objects it tracks have grown by
    700 since it last ran (allocations less deallocations); a batch holds some ten objects
    per event while it runs, nearly all freed by reference counting after it, and every
    collection walks them. At 700 the collector took a third of the daemon's CPU (2,000-event
    batches: 3.1 s of CPU per 100k events, 2.1 s at 20,000). At 20,000 a Redis batch, which
    holds more while it plans, still set it off about once a batch: 6% of the daemon's CPU
    (bench, 300k events in order: 135 collections, 0.69 s of 10.9 s). At 100,000 no batch
    does; what does is a growth that outlives batches, such as the stores' caches filling,
    and cycles, collected at the latest after 100,000 more objects (a few MB)."""
    before = gc.get_threshold()
    gc.set_threshold(100_000, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def run(
    config: Config,
    projections: list[str] | None = None,
    exit_when_caught_up: bool = False,
    clock: Clock = time.time,
    stop: threading.Event | None = None,
) -> int:
    """Run the selected projections until ``stop`` is set (SIGTERM/SIGINT set it when this is
    the main thread) or, with ``exit_when_caught_up``, until all are caught up."""
    return Daemon(config, projections, exit_when_caught_up, clock, stop).run()
